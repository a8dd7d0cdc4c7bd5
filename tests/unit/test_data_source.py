"""`node.datasource.fetch`: a local dataset is verified in place, an http one downloaded (and
resumed) over a real loopback server, and a tampered or foreign one refused."""

from __future__ import annotations

import socket

import pytest

from node.data import Corpus, ShardError, bundled_corpus_path
from node.datasource import FetchError, SourceUnreachable, fetch
from node.shards import MANIFEST, read_manifest
from resbm.data_cmd import prepare
from tests.helpers import serve_directory

pytestmark = pytest.mark.unit

TEXT = bundled_corpus_path().read_text()[:6000]


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    prepare(
        [str(tmp_path / "in.txt")], "bpe:280", tmp_path / "ds", shard_tokens=1500, progress=False
    )
    return tmp_path / "ds"


@pytest.fixture
def server(dataset):
    """A plain static file server on 127.0.0.1 serving the dataset; records every GET."""
    with serve_directory(dataset) as served:
        yield served


def test_a_local_dataset_is_used_in_place_after_verification(dataset, tmp_path):
    fp = Corpus.load(dataset).fingerprint
    assert fetch(str(dataset), tmp_path / "unused", progress=False) == dataset
    assert fetch(f"file://{dataset}", tmp_path / "unused", expect_fingerprint=fp) == dataset
    assert fetch(str(bundled_corpus_path()), tmp_path / "unused") == bundled_corpus_path()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ShardError, match=rf"holds dataset {fp}, the swarm trains on 0123"):
        fetch(str(dataset), tmp_path, expect_fingerprint="0123456789abcdef")
    shard = dataset / read_manifest(dataset)["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(ShardError, match=shard.name):
        fetch(str(dataset), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        fetch(str(tmp_path / "nowhere"), tmp_path)


def test_http_fetch_downloads_verifies_and_resumes(dataset, server, tmp_path):
    url, got = server
    m = read_manifest(dataset)
    dest = tmp_path / "dl"
    assert fetch(url, dest, progress=False, expect_fingerprint=m["fingerprint"]) == dest
    files = sorted(f"/{s['file']}" for s in m["shards"])
    assert sorted(got) == sorted([f"/{MANIFEST}", "/tokenizer.json", *files])
    ours, theirs = Corpus.load(dest), Corpus.load(dataset)
    assert ours.fingerprint == theirs.fingerprint
    assert ours.tokenizer.decode(ours.tokens.tensor().tolist()) == TEXT
    # interrupted: one shard lost, another half-written; a re-run fetches only those two
    (dest / m["shards"][0]["file"]).unlink()
    last = dest / m["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:50])
    got.clear()
    fetch(url + MANIFEST, dest, progress=False)
    assert sorted(got) == sorted([f"/{MANIFEST}", f"/{m['shards'][0]['file']}", f"/{last.name}"])
    assert Corpus.load(dest).fingerprint == theirs.fingerprint


def test_http_fetch_refuses_a_tampered_shard_and_keeps_no_manifest(dataset, server, tmp_path):
    url, _ = server
    m = read_manifest(dataset)
    shard = dataset / m["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    dest = tmp_path / "dl"
    with pytest.raises(ShardError) as err:
        fetch(url, dest, progress=False)
    assert shard.name in str(err.value) and m["shards"][1]["sha256"] in str(err.value)
    assert not (dest / MANIFEST).exists() and not list(dest.glob("*.part"))
    with pytest.raises(FileNotFoundError, match="resbm data prepare"):
        Corpus.load(dest)  # a half-fetched directory is never taken for a dataset


def test_unreachable_or_unknown_sources_say_what_is_wrong(server, tmp_path):
    url, _ = server
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(url + "nothing-here/", tmp_path / "a", progress=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(SourceUnreachable, match="is the data server up"):  # an OSError: retry
        fetch(f"http://127.0.0.1:{closed}/", tmp_path / "z", timeout=2)
    with pytest.raises(FetchError, match="unknown scheme 'ftp'"):
        fetch("ftp://example.org/data", tmp_path / "b")
    with pytest.raises(FetchError, match="hf://datasets/ORG/NAME@REVISION"):
        fetch("hf://models/org/name", tmp_path / "c")
