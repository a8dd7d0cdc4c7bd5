"""Model presets (`--model`), `resbm presets`, and the parameter / FLOPs / memory arithmetic.

The formulas are checked against models built on the meta device: no memory, so `large` is as
cheap to check as `tiny`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import subprocess
import sys

import pytest
import torch

from node.config import MODEL_FLAGS, TrainConfig
from node.model.config import ModelConfig
from node.model.presets import (
    PRESETS,
    PresetName,
    flops_per_token,
    memory_estimate,
    mfu,
    parameter_count,
    peak_flops,
    preset_config,
    stage_counts,
    stage_flops_per_token,
    stage_parameter_counts,
    total_counts,
    wire_bytes_per_token,
)
from node.model.resbm import ResBM
from node.settings import ConfigError, add_flags, from_args, load_settings
from resbm import presets_cmd

pytestmark = pytest.mark.unit


def built(cfg: ModelConfig) -> tuple[int, list[int]]:
    """(parameters of the model, parameters of each stage), counted on the real modules."""
    with torch.device("meta"):
        model = ResBM(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()), [sum(p.numel() for p in s.parameters()) for s in model.stages()]


@pytest.mark.parametrize("vocab", [256, 50257])
@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_is_the_built_models(name, vocab):
    for stages in (2, 4):
        cfg = preset_config(name, vocab_size=vocab, n_stages=stages)
        total, per_stage = built(cfg)
        assert parameter_count(cfg) == total
        assert stage_parameter_counts(cfg) == per_stage
        assert sum(per_stage) == total  # stages share no parameters


def test_parameter_count_for_every_boundary_form():
    forms = itertools.product(
        ["mlp", "fused", "iota"], [True, False], [1, 2, 128], [1, 2, 3, 4], [False, True]
    )
    for encoder, identity, compression, stages, extra in forms:
        cfg = ModelConfig(
            encoder=encoder,
            identity_path=identity,
            compression=compression,
            n_stages=stages,
            encoder_hidden=96 if stages == 3 else 0,
            boundary_norm=extra,
            reembed=extra and encoder != "iota",
        )
        total, per_stage = built(cfg)
        assert (parameter_count(cfg), stage_parameter_counts(cfg)) == (total, per_stage), cfg
        assert sum(stage_counts(cfg)[1:], stage_counts(cfg)[0]) == total_counts(cfg)


def test_presets_match_their_names():
    assert set(PRESETS) == set(PresetName.__args__)
    assert ModelConfig(**PRESETS["tiny"]) == ModelConfig()
    assert ModelConfig(**PRESETS["base"]).model_dump(include={"d_model", "n_layers"}) == {
        "d_model": 768,
        "n_layers": 12,
    }
    for name in PRESETS:
        cfg = preset_config(name)
        assert cfg.boundary_dim >= 2, name  # the default compression 128 fits every preset
    medium = preset_config("medium")
    assert 24 * 12 * medium.d_model**2 >= 300e6  # whatever the tokenizer
    assert parameter_count(medium) >= 300e6
    assert 1.2e9 <= parameter_count(preset_config("large", vocab_size=50257)) <= 1.5e9


def test_explicit_settings_beat_the_preset(tmp_path, monkeypatch):
    cfg = load_settings(TrainConfig, {"preset": "base", "model.n_layers": 6})
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (768, 6, 12)
    assert cfg.model.seq_len == 1024

    monkeypatch.setenv("RESBM_MODEL__N_LAYERS", "6")
    cfg = load_settings(TrainConfig, {"preset": "base"})
    assert (cfg.model.d_model, cfg.model.n_layers) == (768, 6)

    toml = tmp_path / "run.toml"
    toml.write_text('preset = "medium"\n[model]\nseq_len = 512\n')
    cfg = load_settings(TrainConfig, {"model.d_model": 2048}, toml)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.seq_len) == (2048, 6, 512)
    assert cfg.preset == "medium"

    monkeypatch.delenv("RESBM_MODEL__N_LAYERS")
    monkeypatch.setenv("RESBM_PRESET", "small")
    assert load_settings(TrainConfig, {}).model == preset_config("small")
    assert load_settings(TrainConfig, {"preset": "tiny"}).model == ModelConfig()


def test_preset_errors_name_the_flag():
    flags = {dotted: flag for dotted, (flag, _) in MODEL_FLAGS.items()}
    with pytest.raises(ConfigError, match="--model"):
        load_settings(TrainConfig, {"preset": "huge"}, flags=flags)
    with pytest.raises(ConfigError, match="cannot exceed n_layers"):
        load_settings(TrainConfig, {"preset": "tiny", "model.n_stages": 8}, flags=flags)


def test_every_model_command_takes_model_flag():
    from coordinator.config import COORDINATOR_FLAGS, CoordinatorConfig
    from node.node_config import NODE_FLAGS, NodeConfig
    from resbm.simulate import SIM_FLAGS, SimulateConfig

    for cls, table in [
        (TrainConfig, MODEL_FLAGS),
        (NodeConfig, NODE_FLAGS),
        (CoordinatorConfig, COORDINATOR_FLAGS),
        (SimulateConfig, SIM_FLAGS),
    ]:
        parser = argparse.ArgumentParser()
        add_flags(parser, table)
        args = parser.parse_args(["--model", "small", "--n-layers", "6"])
        cfg = from_args(cls, args, table)
        assert cfg.model == preset_config("small", n_layers=6), cls.__name__


def test_flops_per_token_by_hand():
    # tiny at the paper's 128x: d=256, 4 layers, T=128, V=256, 2 stages, b=2, E/D width 256
    cfg = ModelConfig(compression=128, boundary_norm=False)
    blocks = 4 * (3 + 1 + 4 + 4) * 256 * 256  # qkv, proj, mlp up, mlp down
    boundary = 256 * 256 + 256 * 2 + 2 * 256 + 256 * 256  # E up, E down, D up, D down
    head = 256 * 256
    attention = 12 * 4 * 256 * 128
    assert flops_per_token(cfg) == 6 * (blocks + boundary + head) + attention == 21_633_024
    assert sum(stage_flops_per_token(cfg)) == pytest.approx(flops_per_token(cfg))


def test_wire_bytes_per_token():
    cfg = ModelConfig(compression=128)  # b = 2
    assert wire_bytes_per_token(cfg, "fp32") == 8
    assert (
        wire_bytes_per_token(ModelConfig(), "int4-channel", batch_size=16) == 4 + 4 * 8 / 16 / 128
    )
    assert wire_bytes_per_token(cfg, "bf16") == wire_bytes_per_token(cfg, "fp16") == 4
    assert wire_bytes_per_token(cfg, "int8", batch_size=16) == 2 + 4 / (16 * 128)
    assert wire_bytes_per_token(cfg, "int8-channel", batch_size=1) == 2 + 2 * 4 / 128
    assert wire_bytes_per_token(ModelConfig(compression=1), "bf16") == 512
    with pytest.raises(ValueError, match="--wire-codec"):
        wire_bytes_per_token(cfg, "fp8")


def test_memory_estimate_adds_up():
    cfg = preset_config("base", n_stages=4)
    params = stage_parameter_counts(cfg)
    for k in range(4):
        adam = memory_estimate(cfg, k, batch_size=8, optimizer="adamw", precision="fp32")
        muon = memory_estimate(cfg, k, batch_size=8, optimizer="muon", precision="fp32")
        assert adam["weights"] == adam["grads"] == 4 * params[k]
        assert adam["optimizer"] == 8 * params[k] > muon["optimizer"]
        assert adam["total"] == sum(v for key, v in adam.items() if key != "total")
        assert adam["weight_copies"] == 0
        one = memory_estimate(cfg, k, batch_size=8, in_flight=1, precision="fp32")
        assert muon["activations"] == pytest.approx((4 - k) * one["activations"])  # 1F1B
        bf16 = memory_estimate(cfg, k, batch_size=8, precision="bf16")
        assert bf16["activations"] < muon["activations"] and bf16["weight_copies"] > 0
    with pytest.raises(ValueError, match="stage 4"):
        memory_estimate(cfg, 4, batch_size=8)


def saved_bytes(cfg: ModelConfig, k: int, precision: str, batch: int) -> tuple[int, int]:
    """(activation bytes, bf16 weight-copy bytes) that stage k's graph saves for one
    microbatch, as torch's saved-tensor hooks see them (each storage once)."""
    model = ResBM(cfg)
    stage = model.stage(k)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    shapes |= {s[::-1] for s in shapes}  # matmuls save the transposed cast
    acts, copies = {}, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            is_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
            (copies if is_copy else acts)[storage.data_ptr()] = storage.nbytes()
        return t

    width = cfg.boundary_dim if cfg.bottleneck else cfg.d_model
    x = (
        torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
        if k == 0
        else torch.randn(batch, cfg.seq_len, width, requires_grad=True)
    )
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = stage(x)
        if stage.is_last:
            targets = torch.randint(0, cfg.vocab_size, (batch * cfg.seq_len,))
            torch.nn.functional.cross_entropy(out.flatten(0, 1), targets)
    return sum(acts.values()), sum(copies.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("encoder", "compression"), [("mlp", 128), ("fused", 128), ("iota", 128), ("mlp", 1)]
)
def test_activation_estimate_is_what_autograd_saves(encoder, compression, precision):
    cfg = ModelConfig(encoder=encoder, compression=compression, n_layers=3, n_stages=3, seq_len=64)
    for k in range(3):
        acts, copies = saved_bytes(cfg, k, precision, batch=3)
        est = memory_estimate(cfg, k, batch_size=3, in_flight=1, precision=precision)
        # iota's SwiGLU and its receiving block are counted roughly (see _act_bytes): 5%
        rel = 0.05 if encoder == "iota" else 0.02
        assert est["activations"] == pytest.approx(acts, rel=rel), (k, acts)
        assert est["weight_copies"] == copies, k


def test_peak_flops_and_mfu():
    assert peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") < peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(156e12)  # TF32 on
    assert peak_flops("NVIDIA A10G", "bf16") != peak_flops("NVIDIA A10", "bf16")
    assert peak_flops("NVIDIA L40S", "bf16") > peak_flops("NVIDIA L4", "bf16")
    assert peak_flops("cpu", "fp32") is None
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert mfu(6e9, 1e4, 120e12) == pytest.approx(0.5)
    assert mfu(6e9, 1e4, None) is None


def run_presets(*argv: str) -> str:
    parser = argparse.ArgumentParser()
    presets_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["presets", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.handler(args) == 0
    return out.getvalue()


def test_presets_command_json_matches_the_functions():
    report = json.loads(run_presets("--stages", "8", "--vocab-size", "50257", "--json"))
    assert report["settings"]["stages"] == 8
    rows = {r["preset"]: r for r in report["presets"]}
    assert list(rows) == list(PRESETS)
    assert "n_layers" in rows["tiny"]["note"] and "parameters" not in rows["tiny"]
    cfg = preset_config("large", n_stages=8, vocab_size=50257)
    row = rows["large"]
    assert row["note"] is None and row["boundary_dim"] == 64  # d=2048 at the default 32x
    assert row["parameters"] == parameter_count(cfg)
    assert row["stage_parameters"] == stage_parameter_counts(cfg)
    assert row["flops_per_token"] == pytest.approx(flops_per_token(cfg))
    assert row["wire_bytes_per_token"] == wire_bytes_per_token(cfg, "int4-channel", 16)
    worst = max(memory_estimate(cfg, k, batch_size=16)["total"] for k in range(8))
    assert row["memory_max_bytes"] == worst == row["memory"][row["memory_max_stage"]]["total"]


def test_presets_command_table_notes_presets_too_shallow():
    text = run_presets("--stages", "8")
    assert "large" in text and "GFLOP/tok" in text
    assert "note: tiny: n_stages (8) cannot exceed n_layers (4)" in text


def test_presets_help_and_config_import_no_torch():
    code = (
        "import sys, node.config, node.model.presets, resbm.presets_cmd; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
