"""The levers on what crosses a boundary: quantization-aware training (the reference trainer
trains on exactly what the wire codec delivers, gradients passed straight through) and the
normalised boundary (z at unit RMS, a learned gain on the receiving side)."""

from __future__ import annotations

import pytest
import torch

from node.config import TrainConfig
from node.data import Batches, Corpus
from node.model.config import ModelConfig, OptimSettings
from node.model.presets import parameter_count
from node.model.resbm import ResBM
from node.runtime import StageRuntime
from node.trainer import ReferenceTrainer
from node.wire import codec
from node.wire.kinds import WireCodec

pytestmark = pytest.mark.unit

TINY = {"d_model": 64, "n_heads": 2, "n_layers": 2, "seq_len": 32, "compression": 16}


@pytest.mark.parametrize("encoder", ["mlp", "fused"])
def test_a_normalised_boundary_sends_unit_rms_and_learns_a_gain(encoder):
    cfg = ModelConfig(**TINY, encoder=encoder, boundary_norm=True)
    model = ResBM(cfg)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    z = model.stage(0)(x)
    rms = z.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-3, rtol=0)  # eps aside
    gains = [n for n, _ in model.stage(1).named_parameters() if n.endswith("gain")]
    assert gains == ["decoder.gain"]  # on the receiving stage, not the sender
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)
    model.loss(x, x).backward()
    assert model.boundaries[0].decoder.gain.grad is not None


def _runtimes(**kw):
    cfg = ModelConfig(**TINY)
    batches = Batches(Corpus.load(None), cfg.seq_len, 2, seed=0)
    torch.manual_seed(0)
    model = ResBM(cfg)
    first, last = (StageRuntime(s, OptimSettings(), batches, 1, **kw) for s in model.stages())
    return first, last, batches


def test_qat_hands_out_what_the_wire_delivers_and_passes_gradients_straight_through():
    plain_first, _, batches = _runtimes()
    q_first, q_last, _ = _runtimes(wire_codec="int8", qat=True)
    mb = batches.microbatch(0, 0)
    z, zq = plain_first.forward(mb), q_first.forward(mb)
    assert torch.equal(zq, codec.fake_quantize(z, WireCodec.int8)) and not torch.equal(z, zq)
    g = q_last.forward_backward(mb, zq).grad_input
    # already on the int8 grid (up to the rounding of its recomputed scale)
    torch.testing.assert_close(g, codec.fake_quantize(g, WireCodec.int8), rtol=1e-6, atol=0)
    # the same incoming gradient gives stage 0 the same parameter gradients with and without
    # qat: backward runs through the unquantized output (straight through)
    plain_first.backward(mb.id, g)
    q_first.backward(mb.id, g)
    for p, q in zip(plain_first.stage.parameters(), q_first.stage.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_the_reference_trainer_counts_its_wire_bytes_and_qat_changes_training():
    base = {"model": TINY, "steps": 3, "batch_size": 2, "eval_every": 0, "eval_batches": 1}
    fp32 = ReferenceTrainer(TrainConfig(**base), progress=False).run()
    again = ReferenceTrainer(TrainConfig(**base, qat=True), progress=False).run()
    assert again["loss_history"] == fp32["loss_history"]  # fp32's quantizer is the identity
    int4 = ReferenceTrainer(
        TrainConfig(**base, wire_codec="int4-channel", qat=True), progress=False
    ).run()
    # the last stage decodes int4 values from step 0 on: another loss at the same weights
    assert all(a != b for a, b in zip(int4["loss_history"], fp32["loss_history"], strict=True))
    assert abs(int4["loss_history"][0] - fp32["loss_history"][0]) < 0.01 * fp32["loss_history"][0]
    b, tokens = ModelConfig(**TINY).boundary_dim, 2 * TINY["seq_len"]
    for r, payload in ((fp32, 4 * b * tokens), (int4, b * tokens / 2 + 4 * b)):
        per_token = r["wire_bytes_per_token"]
        assert payload / tokens < per_token < (payload + 32) / tokens  # + protobuf framing
