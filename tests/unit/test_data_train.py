"""Prepared data through the training commands: the model takes the data's vocabulary, the
checkpoint carries the tokenizer, `resbm sample` decodes with it, and a joiner that has not got
the swarm's data fetches it only on the stages that cut microbatches."""

from __future__ import annotations

import json

import pytest

from node.checkpoint import load_tokenizer
from node.joining import JoinConfig, apply_manifest
from node.node_config import NodeConfig
from node.process import StartupError, fetch_data
from node.shards import bundled_corpus_path, data_info
from node.swarm.manifest import manifest_for
from resbm.cli import main
from resbm.data_cmd import prepare

pytestmark = pytest.mark.unit

MODEL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--seq-len", "16"]
MODEL += ["--compression", "8", "--batch-size", "2", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "ds"
    text = tmp_path_factory.mktemp("src") / "a.txt"
    text.write_text(bundled_corpus_path().read_text()[:30_000])
    prepare([str(text)], "bpe:300", out, shard_tokens=2_000, progress=False)
    return out


def test_train_takes_the_datas_vocabulary_and_sample_decodes_with_its_tokenizer(
    bpe, tmp_path, capsys
):
    ck = tmp_path / "ck"
    argv = ["train", "--data", str(bpe), "--steps", "3", "--checkpoint-dir", str(ck), "--json"]
    assert main([*argv, *MODEL, "--no-progress", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = json.loads((ck / "run.json").read_text())
    assert run["config"]["model"]["vocab_size"] == 300  # from the data's manifest
    assert run["corpus_fingerprint"] == data_info(bpe).fingerprint
    assert result["parameters"] == result["params"] > 0
    assert load_tokenizer(ck).hash == load_tokenizer(bpe).hash  # the checkpoint carries it
    prompt = "ROMEO: wherefore"
    assert main(["sample", "--checkpoint-dir", str(ck), "--prompt", prompt, "--tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(prompt) and "tokenizer of 300 tokens" in out.err


def test_a_vocabulary_smaller_than_the_datas_is_refused_by_flag(bpe, capsys):
    argv = ["train", "--data", str(bpe), "--vocab-size", "256", "--steps", "1", *MODEL]
    assert main(argv) == 2
    assert "--vocab-size" in capsys.readouterr().err


def _swarm_manifest(data_fp: str, source: str | None, **over):
    cfg = NodeConfig(
        model={
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 3,
            "n_stages": 3,
            "compression": 8,
            "vocab_size": 300,
        },  # the data's, as a coordinator given it derives
        steps=10,
        precision="bf16",
        **over,
    )
    m = manifest_for(cfg, data_fp, "demo")
    return m.model_copy(update={"data_source": source})


def test_a_joiner_without_the_data_takes_the_swarms_fingerprint_and_precision(bpe, tmp_path):
    fp = data_info(bpe).fingerprint
    manifest = _swarm_manifest(fp, str(bpe))
    cfg = apply_manifest(JoinConfig(coordinator="h:1", state_dir=tmp_path), manifest)
    assert cfg.swarm_data == fp and cfg.data is None and cfg.precision == "bf16"
    assert manifest_for(cfg, cfg.swarm_data, "demo") == manifest.model_copy(
        update={"data_source": None}
    )
    # with the swarm's data given, nothing is fetched: it is checked instead
    given = apply_manifest(JoinConfig(coordinator="h:1", state_dir=tmp_path, data=bpe), manifest)
    assert given.swarm_data is None and given.data == bpe
    assert given.model == manifest_model(manifest)  # the data's vocab is not "explicit"


def manifest_model(manifest):
    from node.model.config import ModelConfig

    return ModelConfig.model_validate(manifest.settings["model"])


def test_sample_refuses_to_decode_a_wide_vocabulary_as_bytes(bpe, tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = ["train", "--data", str(bpe), "--steps", "1", "--checkpoint-dir", str(ck), *MODEL]
    assert main([*argv, "--no-progress"]) == 0
    (ck / "tokenizer.json").unlink()
    assert main(["sample", "--checkpoint-dir", str(ck), "--tokens", "2"]) == 2
    assert "tokenizer.json is missing and the model's vocabulary is 300" in capsys.readouterr().err


def test_only_stage_0_and_the_last_stage_fetch_the_data(bpe, tmp_path):
    fp = data_info(bpe).fingerprint
    manifest = _swarm_manifest(fp, str(bpe))
    cfg = apply_manifest(JoinConfig(coordinator="h:1", state_dir=tmp_path), manifest)
    for stage in (0, 2):
        got = fetch_data(cfg.model_copy(update={"stage": stage}), manifest)
        assert got.data == bpe and got.swarm_data is None
    middle = fetch_data(cfg.model_copy(update={"stage": 1}), manifest)
    assert middle.data is None and middle.swarm_data == fp
    # a model that re-embeds tokens on every stage: the middle stage needs the data too
    reembed = cfg.model.model_copy(update={"reembed": True})
    middle = fetch_data(cfg.model_copy(update={"stage": 1, "model": reembed}), manifest)
    assert middle.data == bpe and middle.swarm_data is None
    with pytest.raises(StartupError, match="names no data_source: pass --data"):
        fetch_data(cfg, manifest.model_copy(update={"data_source": None}))
    other = tmp_path / "other"
    prepare([str(bundled_corpus_path())], "bytes", other, progress=False)
    with pytest.raises(StartupError, match="stale"):
        fetch_data(cfg, manifest.model_copy(update={"data_source": str(other)}))
