"""`resbm data prepare` and prepared datasets: exact round trips (bytes, BPE, jsonl, parquet),
windows across shard boundaries, and shards that are missing, truncated or tampered with
refused by name before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from node.data import (
    Batches,
    Corpus,
    DataMismatchError,
    NoTokensError,
    ShardError,
    bundled_corpus_path,
    data_info,
)
from node.shards import MANIFEST, ShardWriter, read_manifest, read_shard
from node.tokenizer import END_OF_TEXT, load_tokenizer, train_bpe
from resbm.cli import main
from resbm.data_cmd import prepare

pytestmark = pytest.mark.unit

TEXT = bundled_corpus_path().read_text()[:20_000]


def stream(directory) -> np.ndarray:
    m = read_manifest(directory)
    return np.concatenate([read_shard(directory / s["file"]) for s in m["shards"]])


def as_bytes(directory) -> bytes:
    return stream(directory).astype(np.uint8).tobytes()


def test_cli_prepares_the_bundled_text_as_exactly_its_bytes_with_the_same_split(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "prepare", str(bundled_corpus_path()), "--out", str(out)]) == 0
    m = read_manifest(out)
    assert m["fingerprint"] in capsys.readouterr().out
    assert as_bytes(out) == bundled_corpus_path().read_bytes()
    assert m["vocab_size"] == 256 and m["tokenizer"]["spec"] == "bytes"
    ours, text = Corpus.load(out), Corpus.load()
    assert torch.equal(ours.train.tensor(), text.train)
    assert torch.equal(ours.val.tensor(), text.val)
    a, b = Batches(ours, 32, 4, seed=3), Batches(text, 32, 4, seed=3)
    mb, theirs = a.microbatch(7, 2), b.microbatch(7, 2)
    assert torch.equal(mb.offsets, theirs.offsets)  # same train size: same draw
    assert torch.equal(a.inputs(mb), b._windows(text.train, mb.offsets, 0))
    assert torch.equal(a.targets(mb), b._windows(text.train, mb.offsets, 1))
    for (x, y), (u, v) in zip(a.val_batches(2), b.val_batches(2), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
    # the same data, but another fingerprint (it hashes the shards): a mixed swarm is refused
    assert ours.fingerprint != text.fingerprint
    with pytest.raises(DataMismatchError, match=f"{ours.fingerprint}.*{text.fingerprint}"):
        b.targets(mb)
    assert main(["data", "prepare", str(bundled_corpus_path()), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_bytes_prepare_of_many_inputs_keeps_every_byte(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9\nnot utf-8: \xff\xfe\n")
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "doc one ✓"}) + "\n\n" + json.dumps({"text": "doc two"}) + "\n"
    )
    m = prepare(
        [str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")],
        "bytes",
        tmp_path / "ds",
        progress=False,
    )
    want = (tmp_path / "a.txt").read_bytes() + b"second file\n" + "doc one ✓doc two".encode()
    assert as_bytes(tmp_path / "ds") == want
    n = len(want)
    assert m["split"] == {"train": [0, n - max(n // 10, 1)], "val": [n - max(n // 10, 1), n]}


def test_bpe_trained_on_the_inputs_round_trips_them(tmp_path):
    docs = [TEXT[:12_000], TEXT[12_000:]]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "ds"
    m = prepare([str(src)], "bpe:300", out, text_key="body", progress=False)
    assert m["vocab_size"] == 300 and m["tokenizer"] == {
        "spec": "bpe:300",
        "hash": m["tokenizer"]["hash"],
        "file": "tokenizer.json",
    }
    corpus = Corpus.load(out)
    tok = corpus.tokenizer
    assert tok.hash == m["tokenizer"]["hash"] and tok.vocab_size == 300
    assert tok.decode(stream(out).tolist()) == docs[0] + END_OF_TEXT + docs[1]
    assert len(stream(out)) < 0.8 * len(TEXT)  # it did learn merges
    assert load_tokenizer("bpe:300", out).hash == tok.hash
    odd = "ünïcode ✓ 世界 \x00 tabs\t and emoji 🎭"
    assert tok.decode(tok.encode(odd)) == odd  # bytes it never saw still round-trip


def test_an_existing_tokenizer_json_is_copied_into_the_dataset(tmp_path):
    tok = train_bpe([TEXT[:5000]], 280)
    path = tok.save(tmp_path / "my-tokenizer.json")
    (tmp_path / "in.txt").write_text(TEXT[:3000])
    m = prepare([str(tmp_path / "in.txt")], str(path), tmp_path / "ds", progress=False)
    assert m["tokenizer"]["spec"] == "tokenizer.json" and m["tokenizer"]["hash"] == tok.hash
    path.unlink()  # the dataset does not need the original any more
    assert Corpus.load(tmp_path / "ds").tokenizer.decode(stream(tmp_path / "ds")) == TEXT[:3000]
    assert data_info(tmp_path / "ds").tokenizer_spec == "tokenizer.json"


def test_parquet_rows_are_documents(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = ["first row", None, "second ✓ row", "third"]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "content": rows}), tmp_path / "t.parquet")
    prepare(
        [str(tmp_path / "t.parquet")],
        "bytes",
        tmp_path / "ds",
        text_column="content",
        progress=False,
    )
    assert as_bytes(tmp_path / "ds") == "first rowsecond ✓ rowthird".encode()
    with pytest.raises(ValueError, match="--text-column"):
        prepare([str(tmp_path / "t.parquet")], "bytes", tmp_path / "d2", progress=False)


def test_bad_inputs_name_what_to_change(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"content": "hi"}\n')
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="--text-key"):
        prepare([str(tmp_path / "x.jsonl")], "bytes", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"\.csv"):
        prepare([str(tmp_path / "x.csv")], "bytes", tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare([str(tmp_path / "*.txt")], "bytes", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="bpe:VOCAB"):
        prepare([str(tmp_path / "x.jsonl")], "bpe:lots", tmp_path / "d", text_key="content")
    with pytest.raises(ValueError, match="vocab_size > 257"):
        prepare([str(tmp_path / "x.jsonl")], "bpe:256", tmp_path / "d", text_key="content")
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_window_across_a_shard_boundary_equals_the_stream(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT[:2000])
    m = prepare(
        [str(tmp_path / "in.txt")], "bytes", tmp_path / "ds", shard_tokens=7, progress=False
    )
    assert len(m["shards"]) == 2000 // 7 + 1 and m["shards"][-1]["tokens"] == 2000 % 7
    corpus, whole = Corpus.load(tmp_path / "ds"), torch.tensor(list(TEXT[:2000].encode()))
    offsets = torch.tensor([0, 5, 6, 13, 40, 1700 - 31], dtype=torch.int64)  # 5 and 6 cross
    for shift in (0, 1):
        got = corpus.train.windows(offsets, 30, shift)
        assert torch.equal(got, whole[offsets[:, None] + torch.arange(30) + shift])
    v = corpus.val.windows(torch.tensor([3]), 20, 1)
    assert torch.equal(v[0], whole[1800 + 4 : 1800 + 24])


def test_wide_vocabularies_use_uint32(tmp_path):
    w = ShardWriter(tmp_path, vocab_size=70_000, shard_tokens=3)
    w.write(np.array([0, 65_535, 65_536, 69_999]))
    shards = w.close()
    assert [s["tokens"] for s in shards] == [3, 1]
    assert read_shard(tmp_path / shards[0]["file"]).dtype == np.dtype("<u4")
    assert read_shard(tmp_path / shards[1]["file"]).tolist() == [69_999]
    with pytest.raises(ValueError, match="outside"):
        ShardWriter(tmp_path, vocab_size=256).write(np.array([256]))


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT[:3000])
    prepare([str(tmp_path / "in.txt")], "bytes", tmp_path / "ds", shard_tokens=1000, progress=False)
    return tmp_path / "ds", read_manifest(tmp_path / "ds")


def test_a_tampered_shard_is_refused_naming_it_and_both_hashes(dataset):
    d, m = dataset
    shard = d / m["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError) as err:
        Corpus.load(d)
    msg = str(err.value)
    assert shard.name in msg and m["shards"][1]["sha256"] in msg
    import hashlib

    assert hashlib.sha256(bytes(raw)).hexdigest() in msg


def test_a_truncated_shard_is_refused_naming_it_and_both_sizes(dataset):
    d, m = dataset
    shard = d / m["shards"][0]["file"]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=rf"{shard.name} has {size - 10} bytes, expected {size}"):
        Corpus.load(d)


def test_a_missing_shard_or_manifest_is_refused(dataset):
    d, m = dataset
    (d / m["shards"][2]["file"]).unlink()
    with pytest.raises(ShardError, match=rf"{m['shards'][2]['file']} is missing.*sha256"):
        Corpus.load(d)
    (d / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="resbm data prepare"):
        Corpus.load(d)


def test_an_edited_manifest_is_refused(dataset):
    d, m = dataset
    m["split"] = {"train": [0, 2000], "val": [2000, 3000]}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="does not match its contents"):
        data_info(d)


def test_data_info_is_cheap_and_agrees_with_load(dataset):
    d, _ = dataset
    info = data_info(d)
    assert (info.train_tokens, info.val_tokens, info.vocab_size) == (2700, 300, 256)
    assert info.fingerprint == Corpus.load(d).fingerprint == Corpus.fingerprint_of(d)
    assert info.tokenizer_spec == "bytes" and info.source == str(d)
    text = data_info(None)
    assert text.fingerprint == Corpus.load().fingerprint
    assert text.train_tokens == Corpus.load().train.numel() and text.vocab_size == 256


def test_a_middle_stage_checks_microbatches_without_tokens(dataset):
    d, _ = dataset
    first = Batches(Corpus.load(d), 16, 2, seed=0)
    info = data_info(d)
    middle = Batches(Corpus.without_tokens(info.fingerprint, str(d)), 16, 2, seed=0)
    mb = first.microbatch(3, 1)
    middle.check(mb)  # shape, dtype and fingerprint: all it needs
    with pytest.raises(NoTokensError, match="only stage 0 and the last stage"):
        middle.inputs(mb)
    with pytest.raises(NoTokensError):
        middle.targets(mb)
    other = Batches(Corpus.load(), 16, 2, seed=0).microbatch(3, 1)
    with pytest.raises(DataMismatchError, match=info.fingerprint):
        middle.check(other)
    sized = Batches(
        Corpus.without_tokens(info.fingerprint, train_tokens=info.train_tokens), 16, 2, seed=0
    )
    assert torch.equal(sized.microbatch(3, 1).offsets, mb.offsets)
    bad = type(mb)(mb.id, torch.tensor([0, info.train_tokens]), mb.fingerprint)
    with pytest.raises(ValueError, match="outside"):
        sized.check(bad)
