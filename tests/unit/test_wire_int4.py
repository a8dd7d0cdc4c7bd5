"""The int4-channel wire codec, `fake_quantize` (what a receiver decodes, without protobuf) and
`wire_bytes` (a pb.Tensor's serialized size, without encoding)."""

from __future__ import annotations

import math

import pytest
import torch

from node.data import MicrobatchId
from node.wire._pb import stage_pb2 as pb
from node.wire.codec import (
    WireCodec,
    WireError,
    bits,
    decode,
    encode,
    fake_quantize,
    itemsize,
    payload_bytes,
    wire_bytes,
)
from node.wire.messages import Forward, Reassembler, from_pb, split, to_pb

pytestmark = pytest.mark.unit

INT4 = WireCodec.int4_channel
SHAPE = (4, 8, 3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 values as their bit patterns: equal means bit for bit, -0.0 and NaN included."""
    assert t.dtype == torch.float32
    return t.contiguous().view(torch.int32)


def _channels(shape=SHAPE, seed=0) -> torch.Tensor:
    """Channels of very different magnitudes: per-channel scales matter."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-3, 2, shape[-1])
    return torch.randn(shape, generator=g) * mags


def test_round_trip_error_is_at_most_half_a_step_per_channel():
    t = _channels()
    msg = encode(t, INT4)
    scale = torch.tensor(list(msg.scales))
    amax = t.abs().reshape(-1, SHAPE[-1]).amax(dim=0)
    assert torch.equal(scale, amax / 7)  # fp32 scales, amax/7, one per channel
    back = decode(msg, SHAPE)
    assert back.dtype == torch.float32 and back.shape == SHAPE
    err = (back - t).abs().reshape(-1, SHAPE[-1]).amax(dim=0)
    assert (err <= scale / 2 * (1 + 1e-5)).all(), (err, scale)
    q = back / scale  # integers in [-7, 7], and each channel's extreme lands on +-7
    assert torch.equal(q, q.round()) and q.abs().max() == 7
    assert torch.equal(q.abs().reshape(-1, SHAPE[-1]).amax(dim=0), torch.full((SHAPE[-1],), 7.0))


def test_zero_is_exact_and_a_zero_channel_stays_zero():
    t = _channels()
    t[..., 1] = 0
    t[0, 0, 0] = 0
    back = decode(encode(t, INT4), SHAPE)
    assert back[0, 0, 0] == 0 and torch.count_nonzero(back[..., 1]) == 0


def test_packing_is_low_nibble_first_twos_complement_and_pads_odd_counts():
    # one channel, amax 7 -> scale 1, so the values are their own codes
    odd = torch.tensor([[7.0], [-7.0], [1.0]])
    msg = encode(odd, INT4)
    assert msg.data == bytes([0x97, 0x01])  # 7 | -7 (0b1001) << 4, then 1 and a zero pad nibble
    assert list(msg.scales) == [1.0]
    assert torch.equal(decode(msg, (3, 1)), odd)
    even = torch.tensor([[7.0], [-7.0], [1.0], [-1.0]])
    assert encode(even, INT4).data == bytes([0x97, 0xF1])
    assert torch.equal(decode(encode(even, INT4), (4, 1)), even)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 3), (4, 8, 2), (2, 7, 33), (5,)])
def test_payload_is_half_a_byte_a_value_plus_one_scale_per_channel(shape):
    msg = encode(torch.randn(shape), INT4)
    n = math.prod(shape)
    assert len(msg.data) == payload_bytes(INT4, shape) == -(-n // 2)
    assert len(msg.scales) == shape[-1]
    assert itemsize(INT4) == 0.5 and bits(INT4) == 4
    assert payload_bytes(WireCodec.int8_channel, shape) == n  # int8: twice as many
    assert decode(msg, shape).shape == shape


def _int4(**changes) -> pb.Tensor:
    msg = encode(_channels((3, 5, 3)), INT4)  # 45 values: 23 bytes, the last with a pad nibble
    for k, v in changes.items():
        if k == "scales":
            del msg.scales[:]
            msg.scales.extend(v)
        else:
            setattr(msg, k, v)
    return msg


def _with_byte(i: int, value: int) -> bytes:
    data = bytearray(_int4().data)
    data[i] = value
    return bytes(data)


@pytest.mark.parametrize(
    "msg,needle",
    [
        (_int4(data=_with_byte(0, 0x08)), "-8"),  # low nibble 0b1000
        (_int4(data=_with_byte(5, 0x80)), "-8"),  # high nibble 0b1000
        (_int4(data=_with_byte(22, 0x11)), "padding"),  # the odd count's pad nibble is not 0
        (_int4(data=_int4().data[:-1]), "payload is 22 bytes"),  # truncated
        (_int4(data=_int4().data + b"\x00"), "payload is 24 bytes"),
        (_int4(data=_int4().data * 2), "needs 23"),  # one byte a value: an int8 payload
        (_int4(scales=[1.0, 1.0]), "needs 3 scales, got 2"),
        (_int4(scales=[1.0] * 45), "needs 3 scales, got 45"),  # per value, not per channel
        (_int4(scales=[1.0, float("nan"), 1.0]), "finite"),
        (_int4(scales=[1.0, float("inf"), 1.0]), "finite"),
        (_int4(scales=[1.0, -1.0, 1.0]), ">= 0"),
        (_int4(scales=[1.0, 1e6, 1.0]), "beyond"),  # finite but absurd
        (_int4(scales=[1.0, 3e38, 1.0]), "NaN/Inf"),  # 7 * 3e38 overflows fp32
    ],
)
def test_garbage_int4_is_refused_with_invalid_argument(msg, needle):
    with pytest.raises(WireError) as err:
        decode(msg, (3, 5, 3), frozenset({INT4}))
    assert err.value.code == "INVALID_ARGUMENT"
    assert needle in str(err.value)


def test_int4_refuses_to_send_nan_and_is_refused_where_not_allowed():
    t = _channels()
    t[1, 1, 1] = float("nan")
    with pytest.raises(WireError, match="NaN"):
        encode(t, INT4)
    with pytest.raises(WireError, match="not accepted here"):
        decode(encode(_channels(), INT4), SHAPE, frozenset({WireCodec.int8_channel}))


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = _channels((6, 10, 4), seed=2)
    ties = torch.arange(-14, 15, dtype=torch.float32) / 2  # k + 0.5 steps: round half to even
    ties = torch.stack([ties, ties * 0.1, -ties], dim=-1)  # amax 7 -> scale 1 in channel 0
    signed_zeros = torch.tensor([[0.0, -0.0], [-0.0, 1.0], [2.5, -0.0]])
    return {
        "randn": torch.randn(4, 8, 2, generator=g) * 3,
        "channels": base,
        "non_contiguous": base.transpose(0, 2),  # (4, 10, 6), strided
        "sliced": base[:, ::3, 1:],
        "bf16": (torch.randn(4, 8, 3, generator=g) * 5).to(torch.bfloat16),
        "fp16": torch.randn(3, 7, 5, generator=g).to(torch.float16),
        "fp64": torch.randn(2, 9, 3, generator=g, dtype=torch.float64),
        "ties": ties,
        "signed_zeros": signed_zeros,
        "zeros": torch.zeros(2, 3, 2),
        "odd": torch.randn(3, 5, 3, generator=g),
        "tiny": torch.randn(2, 4, 2, generator=g) * 1e-35,
    }


@pytest.mark.parametrize("codec", list(WireCodec))
@pytest.mark.parametrize("name", list(_inputs()))
def test_fake_quantize_is_decode_of_encode_bit_for_bit(codec, name):
    t = _inputs()[name]
    want = decode(encode(t, codec), tuple(t.shape))
    got = fake_quantize(t, codec)
    assert got.dtype == torch.float32 and got.shape == t.shape and got.device == t.device
    assert torch.equal(_bits(got), _bits(want)), (codec, name)


def test_fake_quantize_of_fp32_is_the_tensor_itself():
    t = torch.randn(SHAPE, requires_grad=True)
    assert fake_quantize(t, WireCodec.fp32) is t  # t.float(): the identity, gradient included
    b = t.detach().to(torch.bfloat16)
    assert torch.equal(fake_quantize(b, "fp32"), b.float())
    assert not fake_quantize(t, INT4).requires_grad  # the others: values only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("codec", list(WireCodec))
def test_fake_quantize_on_cuda_matches_the_cpu_wire(codec):
    for name, t in _inputs().items():
        got = fake_quantize(t.cuda(), codec)
        assert got.device.type == "cuda"
        want = decode(encode(t, codec), tuple(t.shape))
        assert torch.equal(_bits(got.cpu()), _bits(want)), (codec, name)
    big = torch.randn(16, 128, 37, device="cuda") * torch.logspace(-2, 2, 37, device="cuda")
    want = decode(encode(big, codec), tuple(big.shape))
    assert torch.equal(_bits(fake_quantize(big, codec).cpu()), _bits(want)), codec


SHAPES = [
    (),  # a scalar: no shape field
    (5,),
    (1, 1, 1),
    (4, 8, 2),
    (3, 5, 3),
    (1, 200, 2),  # a dim past 127: a 2-byte varint
    (2, 20000, 1),  # past 16383: 3 bytes
    (1, 1, 40),  # 160 bytes of scales
    (16, 128, 2),
]
# payload lengths across the varint steps of the data field's length (1 -> 2 -> 3 bytes)
PAYLOADS = [100, 126, 128, 200, 16382, 16384, 20000]


@pytest.mark.parametrize("codec", list(WireCodec))
def test_wire_bytes_is_the_encoded_message_size(codec):
    shapes = [s for s in SHAPES if s or codec not in (WireCodec.int8_channel, INT4)]
    for n_bytes in PAYLOADS:  # shapes whose payload is exactly n_bytes
        if n_bytes * 8 % bits(codec) == 0:
            values = n_bytes * 8 // bits(codec)
            shapes += [(values, 1), (1, values)]  # (1, values): one scale a value per channel
    for shape in shapes:
        msg = encode(torch.randn(shape), codec)
        assert wire_bytes(codec, shape) == msg.ByteSize(), (codec, shape)
    assert wire_bytes(codec.value, (100, 1)) == wire_bytes(codec, (100, 1))


def test_int4_payloads_of_100_200_and_20000_bytes():
    for n_bytes in (100, 200, 20000):
        for shape in ((2 * n_bytes, 1), (2 * n_bytes - 1, 1), (n_bytes, 2)):
            msg = encode(torch.randn(shape), INT4)
            assert len(msg.data) == n_bytes
            assert wire_bytes(INT4, shape) == msg.ByteSize()


def test_int4_travels_in_chunks_and_reassembles_exactly():
    t = _channels((4, 63, 5))  # 1260 values: 630 bytes
    fwd = to_pb(Forward(MicrobatchId(0, 0), t, torch.arange(4), "fp"), INT4)
    assert fwd.forward.z.ByteSize() == wire_bytes(INT4, t.shape)
    parts = split(fwd, chunk_bytes=100)
    assert len(parts) == 1 + 7
    r = Reassembler(max_tensor_bytes=payload_bytes(INT4, t.shape))  # what a link allows
    outs = [r.feed(p) for p in parts]
    back = from_pb(outs[-1], t.shape, batch_size=4, allowed=frozenset({INT4}))
    assert torch.equal(_bits(back.z), _bits(fake_quantize(t, INT4)))


def test_int4_is_offered_wherever_codecs_are_listed():
    from node.model.config import ModelConfig
    from node.model.presets import wire_bytes_per_token
    from resbm.bench.codecs import CODECS as BENCH
    from resbm.presets_cmd import CODECS as PRESETS

    every = {c.value for c in WireCodec}
    assert set(BENCH) == set(PRESETS) == every
    cfg = ModelConfig(compression=128)  # b = 2, seq_len 128
    assert wire_bytes_per_token(cfg, "int4-channel", batch_size=1) == 1 + 2 * 4 / 128
