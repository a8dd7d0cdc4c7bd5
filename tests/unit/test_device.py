"""Devices and precision on the CPU: device resolution and its errors, bf16 autocast over fp32
master weights, host fp32 tensors at the runtime's edge, a codec that takes any tensor layout,
and what `train --json` reports about the hardware."""

from __future__ import annotations

import math

import pytest
import torch

from node import device as devices
from node.config import TrainConfig
from node.data import Batches, Corpus
from node.model.config import ModelConfig, OptimSettings
from node.model.resbm import ResBM
from node.runtime import StageRuntime
from node.settings import ConfigError, load_settings
from node.trainer import ReferenceTrainer
from node.wire import codec
from node.wire.kinds import WireCodec

pytestmark = pytest.mark.unit

TINY = {"d_model": 64, "n_heads": 2, "n_layers": 2, "seq_len": 32, "compression": 16}


def test_devices_resolve_and_refuse_by_name():
    assert devices.resolve("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve("auto").type == want
    with pytest.raises(devices.DeviceError, match="--device 'gpu'"):
        devices.resolve("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(devices.DeviceError, match="--device cuda:1: no CUDA device"):
            devices.resolve("cuda:1")


def test_a_bad_device_or_precision_setting_names_its_flag():
    from node.config import TRAIN_FLAGS

    flags = {d: f for d, (f, _) in TRAIN_FLAGS.items()}
    with pytest.raises(ConfigError, match="--device"):
        load_settings(TrainConfig, {"device": "tpu"}, flags=flags)
    with pytest.raises(ConfigError, match="--precision"):
        load_settings(TrainConfig, {"precision": "fp8"}, flags=flags)
    cfg = load_settings(TrainConfig, {"device": "cuda:1", "precision": "bf16"}, flags=flags)
    assert (cfg.device, cfg.precision) == ("cuda:1", "bf16")  # the hardware is checked at start


def _runtime(k: int, precision: str):
    cfg = ModelConfig(**TINY)
    batches = Batches(Corpus.load(None), cfg.seq_len, 2, seed=0)
    torch.manual_seed(0)
    stage = ResBM(cfg).stage(k)
    return StageRuntime(stage, OptimSettings(), batches, 1, "cpu", precision), batches


def test_bf16_autocast_computes_in_bf16_and_hands_host_fp32_to_the_wire():
    first, batches = _runtime(0, "bf16")
    seen = []
    first.stage.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    mb = batches.microbatch(0, 0)
    z = first.forward(mb)
    assert seen == [torch.bfloat16]  # matmuls ran in bf16; the residual stream stays fp32
    assert z.dtype == torch.float32 and z.device.type == "cpu"
    grad = first.backward(mb.id, torch.ones_like(z))
    assert grad is None  # stage 0
    assert all(p.dtype == torch.float32 for p in first.stage.parameters())  # fp32 masters
    assert all(
        p.grad.dtype == torch.float32 for p in first.stage.parameters() if p.grad is not None
    )

    last, _ = _runtime(1, "bf16")
    out = last.forward_backward(mb, z)
    assert out.grad_input.dtype == torch.float32 and math.isfinite(out.loss)


def test_bf16_training_follows_fp32_closely_but_not_exactly():
    base = {"model": TINY, "steps": 6, "batch_size": 4, "eval_every": 0, "eval_batches": 2}
    fp32 = ReferenceTrainer(TrainConfig(**base, device="cpu"), progress=False).run()
    bf16 = ReferenceTrainer(TrainConfig(**base, device="cpu", precision="bf16"), progress=False)
    got = bf16.run()
    pairs = list(zip(fp32["loss_history"], got["loss_history"], strict=True))
    assert all(abs(a - b) < 0.02 * a for a, b in pairs), pairs
    assert any(a != b for a, b in pairs)  # autocast really ran
    assert got["precision"] == "bf16" and got["device"] == "cpu"
    assert got["parameters"] == sum(p.numel() for p in bf16.model.parameters())
    assert got["peak_memory_bytes"] > 0
    assert got["mfu"] is None  # a CPU's peak is not known


def test_the_codec_takes_any_layout_and_dtype():
    t = torch.randn(3, 5, 4)
    strided = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not strided.is_contiguous()
    for c in (WireCodec.fp32, WireCodec.bf16, WireCodec.int8_channel):
        assert codec.encode(strided, c) == codec.encode(t, c)
    half = codec.encode(t.bfloat16(), WireCodec.fp32)
    assert torch.equal(codec.decode(half, (3, 5, 4)), t.bfloat16().float())


def test_host_edge_is_free_on_the_cpu():
    edge = devices.HostEdge(torch.device("cpu"))
    t = torch.randn(2, 3)
    assert edge.to_device(t) is t
    assert edge.to_host(t).data_ptr() == t.data_ptr()
    assert edge.to_host(t.bfloat16()).dtype == torch.float32


def test_a_loaded_optimizer_state_keeps_this_machines_implementation_flags():
    """A GPU node resuming from (or downloading) a CPU replica's state keeps its fused AdamW:
    load_state_dict would otherwise take the saver's flags with its param groups."""
    from node import checkpoint

    saver, _ = _runtime(1, "fp32")
    loader, _ = _runtime(1, "fp32")
    for opt in loader.optimizers:
        for g in opt.param_groups:
            g["foreach"] = True  # stands for this machine's choice (fused on CUDA)
    tensors, meta = checkpoint.stage_state(saver, 3)
    assert checkpoint.load_stage_state(loader, tensors, meta) == 3
    assert all(g["foreach"] is True for o in loader.optimizers for g in o.param_groups)
