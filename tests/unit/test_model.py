"""The ResBM definition: stage cut, boundary, equivalence of stages with the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from node.data import Batches, Corpus
from node.model.bottleneck import truncate, zero_pad
from node.model.config import OptimSettings
from node.model.resbm import ResBM, stage_spans
from node.runtime import StageRuntime
from tests.helpers import tiny_model


@pytest.mark.parametrize("n_layers", range(1, 13))
def test_stage_spans_cover_every_layer_once_and_balance(n_layers):
    for n_stages in range(1, n_layers + 1):
        spans = stage_spans(n_layers, n_stages)
        layers = [j for span in spans for j in span]
        assert layers == list(range(n_layers)), (n_layers, n_stages, spans)
        sizes = [len(s) for s in spans]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_leftover_layers_go_to_middle_stages_first():
    assert [len(s) for s in stage_spans(6, 4)] == [1, 2, 2, 1]
    assert [len(s) for s in stage_spans(7, 4)] == [2, 2, 2, 1]
    assert [len(s) for s in stage_spans(3, 2)] == [2, 1]


def test_stage_spans_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="n_stages"):
        stage_spans(2, 3)


def test_stages_partition_the_parameters():
    model = ResBM(tiny_model())
    owned = [id(p) for st in model.stages() for p in st.parameters()]
    assert len(owned) == len(set(owned)), "a parameter belongs to two stages"
    assert set(owned) == {id(p) for p in model.parameters()}, "a parameter belongs to no stage"


FORMS = [(1, "mlp"), (128, "mlp"), (128, "fused"), (128, "iota")]


@pytest.mark.parametrize("compression,encoder", FORMS)
def test_boundary_tensor_shape(compression, encoder):
    cfg = tiny_model(compression=compression, encoder=encoder)
    model = ResBM(cfg)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    z = model.stage(0)(x)
    assert z.shape == (2, cfg.seq_len, cfg.d_model // compression)
    assert model.stage(1)(z).shape == (2, cfg.seq_len, cfg.d_model // compression)
    assert model.stage(2)(model.stage(1)(z)).shape == (2, cfg.seq_len, 256)


def _stage_path_grads(model, batches, mb):
    """Forward/backward through StageRuntimes, passing only detached z and dL/dz."""
    runtimes = [StageRuntime(s, OptimSettings(), batches, 1) for s in model.stages()]
    z = None
    for rt in runtimes[:-1]:
        z = rt.forward(mb, z)
    res = runtimes[-1].forward_backward(mb, z)
    g = res.grad_input
    for rt in reversed(runtimes[:-1]):
        g = rt.backward(mb.id, g)
    return res.loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "compression,encoder,extra",
    [(c, e, {}) for c, e in FORMS]
    + [(128, "mlp", {"reembed": True}), (1, "mlp", {"reembed": True})]
    + [(128, "fused", {"boundary_norm": True}), (128, "iota", {"boundary_norm": True})],
)
def test_stage_composition_equals_whole_model(compression, encoder, extra):
    cfg = tiny_model(compression=compression, encoder=encoder, **extra)
    torch.manual_seed(0)
    model = ResBM(cfg)
    batches = Batches(Corpus.load(), cfg.seq_len, batch_size=3, seed=1)
    mb = batches.microbatch(0, 0)
    x, y = batches.inputs(mb), batches.targets(mb)

    whole_logits = model(x)
    staged = x
    for st in model.stages():
        staged = st(staged) if st.is_first else st(staged, x)  # x: for reembed stages only
    assert torch.equal(whole_logits, staged)

    loss = model.loss(x, y)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    stage_loss, staged_grads = _stage_path_grads(model, batches, mb)
    assert stage_loss == pytest.approx(loss.item(), rel=1e-6)
    assert whole.keys() == staged_grads.keys()
    for name, g in whole.items():
        torch.testing.assert_close(staged_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
        assert g.abs().sum() > 0 or "rotary" in name, f"{name} got no gradient"


def _zero(*weights):
    with torch.no_grad():
        for w in weights:
            w.zero_()


def test_zeroed_mlp_encoder_decoder_is_exactly_the_rank_b_identity():
    cfg = tiny_model(compression=32, boundary_norm=False)  # b = 4
    model = ResBM(cfg)
    boundary = model.boundaries[0]
    _zero(boundary.encoder.down.weight, boundary.decoder.down.weight)
    h = torch.randn(2, cfg.seq_len, cfg.d_model)
    z = boundary.encode(h)
    assert torch.equal(z, h[..., :4])
    rebuilt = boundary.decode(z)
    assert torch.equal(rebuilt[..., :4], h[..., :4])
    assert torch.count_nonzero(rebuilt[..., 4:]) == 0
    assert torch.equal(rebuilt, zero_pad(truncate(h, 4), cfg.d_model))


def test_zeroed_fused_boundary_is_exactly_the_rank_b_identity():
    cfg = tiny_model(compression=32, encoder="fused", n_layers=2, n_stages=2, boundary_norm=False)
    model = ResBM(cfg)
    enc_block, decoder = model.blocks[0], model.boundaries[0].decoder
    _zero(enc_block.mlp.down.weight, enc_block.attn.proj.weight, decoder.proj.weight)
    h = torch.randn(2, cfg.seq_len, cfg.d_model)
    z = enc_block(h)  # attention branch zeroed too: only the J_b skip is left
    assert torch.equal(z, h[..., :4])
    assert torch.equal(decoder(z), zero_pad(h[..., :4], cfg.d_model))


def test_identity_path_off_has_no_skip():
    cfg = tiny_model(compression=32, identity_path=False, boundary_norm=False)
    boundary = ResBM(cfg).boundaries[0]
    _zero(boundary.encoder.down.weight, boundary.decoder.down.weight)
    assert torch.count_nonzero(boundary.encode(torch.randn(2, cfg.seq_len, cfg.d_model))) == 0
    assert torch.count_nonzero(boundary.decode(torch.randn(2, cfg.seq_len, 4))) == 0


def test_identity_path_off_fused_has_no_skip():
    cfg = tiny_model(
        compression=32,
        encoder="fused",
        identity_path=False,
        n_layers=2,
        n_stages=2,
        boundary_norm=False,
    )
    model = ResBM(cfg)
    _zero(model.blocks[0].mlp.down.weight, model.boundaries[0].decoder.proj.weight)
    h = torch.randn(2, cfg.seq_len, cfg.d_model)
    assert torch.count_nonzero(model.blocks[0](h)) == 0
    assert torch.count_nonzero(model.boundaries[0].decoder(torch.randn(2, cfg.seq_len, 4))) == 0


def test_same_seed_same_weights_in_every_process():
    """Nodes rebuild the whole model from the seed and keep their stage: inits must agree."""
    torch.manual_seed(7)
    a = ResBM(tiny_model())
    torch.manual_seed(7)
    b = ResBM(tiny_model())
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("encoder,attr", [("mlp", "up"), ("fused", "proj")])
def test_decoder_input_layer_gets_a_fan_in_init(encoder, attr):
    cfg = tiny_model(compression=32, encoder=encoder, d_model=256, n_heads=4)  # b = 8
    w = getattr(ResBM(cfg).boundaries[0].decoder, attr).weight
    assert w.shape[1] == 8 and abs(w.std().item() - 8**-0.5) < 0.05
    small = getattr(
        ResBM(cfg.model_copy(update={"decoder_init": "small"})).boundaries[0].decoder, attr
    ).weight
    assert abs(small.std().item() - 0.02) < 0.005


def test_iota_form_feeds_relu_wz_to_the_first_attention_only():
    """IOTA's receiving block: h = J_bᵀ z + attn(norm ReLU(W z)), then + mlp(norm h); its
    sending block's feed-forward is a SwiGLU down to b with the J_b skip."""
    from node.model.layers import SwiGLU

    cfg = tiny_model(
        compression=32, encoder="iota", n_layers=2, n_stages=2, boundary_norm=False
    )  # b = 4
    model = ResBM(cfg)
    sender, receiver = model.blocks[0], model.blocks[1]
    assert isinstance(sender.mlp, SwiGLU) and sender.mlp.down.out_features == 4
    assert isinstance(model.boundaries[0].decoder, torch.nn.Identity)
    z = torch.randn(2, cfg.seq_len, 4)
    h = zero_pad(z, cfg.d_model) + receiver.attn(receiver.attn_norm(F.relu(receiver.lift(z))))
    expected = h + receiver.mlp(receiver.mlp_norm(h))
    torch.testing.assert_close(receiver(z), expected, rtol=0, atol=0)
    # with the attention's output zeroed, W no longer matters: it feeds nothing else
    _zero(receiver.attn.proj.weight, receiver.mlp.down.weight)
    assert torch.equal(receiver(z), zero_pad(z, cfg.d_model))
    _zero(sender.attn.proj.weight, sender.mlp.down.weight)
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    assert torch.equal(sender(x), x[..., :4])


def test_iota_decoder_weight_gets_the_fan_in_init():
    cfg = tiny_model(compression=32, encoder="iota", d_model=256, n_heads=4)  # b = 8
    w = ResBM(cfg).blocks[1].lift.weight  # stage 1's first block (3 layers over 3 stages)
    assert w.shape == (256, 8) and abs(w.std().item() - 8**-0.5) < 0.05


@pytest.mark.parametrize("encoder", ["mlp", "fused", "iota"])
def test_normalised_boundary_gain_scales_only_the_identity_path(encoder):
    """D reads the unit-RMS z; the gain (init 0.02, the residual scale at init) scales J_bᵀ z."""
    from node.model.layers import GAIN_INIT

    cfg = tiny_model(compression=32, encoder=encoder, n_layers=2, n_stages=2, boundary_norm=True)
    model = ResBM(cfg)
    receiver = model.blocks[1] if encoder == "iota" else model.boundaries[0].decoder
    assert torch.equal(receiver.gain, torch.full((4,), GAIN_INIT))
    z = torch.randn(2, cfg.seq_len, 4)
    if encoder == "iota":
        _zero(receiver.attn.proj.weight, receiver.mlp.down.weight)
    else:
        _zero(receiver.down.weight if encoder == "mlp" else receiver.proj.weight)
    assert torch.equal(receiver(z), zero_pad(z * GAIN_INIT, cfg.d_model))


def test_reembed_adds_each_stage_its_own_token_embedding():
    cfg = tiny_model(compression=32, reembed=True)  # 3 stages
    model = ResBM(cfg)
    assert [cfg.needs_tokens(k) for k in range(3)] == [True, True, True]
    assert [tiny_model().needs_tokens(k) for k in range(3)] == [True, False, True]
    x = torch.randint(0, 256, (2, cfg.seq_len))
    z = model.stage(0)(x)
    with pytest.raises(ValueError, match="re-embeds its tokens"):
        model.stage(1)(z)
    middle = model.stage(1)
    assert middle.needs_tokens and middle.reembed is model.reembeds[0]
    assert not any(n.startswith("embed") for n, _ in middle.named_parameters())
    # a stage's embedding goes to AdamW, not Muon, like stage 0's
    from node.model.optim import param_groups

    hidden, rest = param_groups(middle)
    assert any(p is middle.reembed.weight for p in rest)
    assert not any(p is middle.reembed.weight for p in hidden)
    with pytest.raises(ValueError, match="use encoder mlp or fused with reembed"):
        tiny_model(encoder="iota", reembed=True)
