"""Tensor <-> wire bytes, and the validation every received tensor goes through.

Codecs: fp32 (exact; the equivalence tests use it), bf16 (default), fp16, symmetric int8 with one
scale per tensor or per channel, and symmetric int4 with one scale per channel. A per-token scale
is deliberately absent: at b=2 channels one fp32 scale per token would make the message bigger
than bf16.

The integer codecs are symmetric: q = round(x / scale) clamped to [-qmax, qmax], qmax = 127 (int8)
or 7 (int4), scale = amax / qmax (fp32, over the tensor or over each channel: the last dim), and
the receiver takes q * scale. Zero is exact and the range is symmetric, so -128 / -8 never occur.
int4 packs two values a byte, the earlier value (in C order) in the low nibble, each nibble the
value's 4-bit two's complement; an odd count ends with a zero high nibble. The payload of n values
is ceil(n/2) bytes.

`fake_quantize` computes what a receiver would decode without protobuf, with torch ops on the
tensor's own device (a trainer trains on exactly what the wire carries), and `wire_bytes` the size
of the pb.Tensor message `encode` would build, without building it.

Nothing a peer sends is trusted: codec, shape, byte length, scales, int values and finiteness are
all checked before a tensor reaches the model, and a failure is a WireError carrying the gRPC
status name that the node reports back to the sender.
"""

from __future__ import annotations

import math

import torch

from node.wire._pb import stage_pb2 as pb
from node.wire.kinds import WireCodec

_PB = {
    WireCodec.fp32: pb.FP32,
    WireCodec.bf16: pb.BF16,
    WireCodec.fp16: pb.FP16,
    WireCodec.int8: pb.INT8_TENSOR,
    WireCodec.int8_channel: pb.INT8_CHANNEL,
    WireCodec.int4_channel: pb.INT4_CHANNEL,
}
_FROM_PB = {v: k for k, v in _PB.items()}
_BITS = {  # bits a value takes in the payload
    WireCodec.fp32: 32,
    WireCodec.bf16: 16,
    WireCodec.fp16: 16,
    WireCodec.int8: 8,
    WireCodec.int8_channel: 8,
    WireCodec.int4_channel: 4,
}
_FLOAT = {
    WireCodec.fp32: torch.float32,
    WireCodec.bf16: torch.bfloat16,
    WireCodec.fp16: torch.float16,
}
_QMAX = {WireCodec.int8: 127, WireCodec.int8_channel: 127, WireCodec.int4_channel: 7}
_PER_CHANNEL = frozenset({WireCodec.int8_channel, WireCodec.int4_channel})
SCALE_BYTES = 4  # scales travel as fp32


class WireError(ValueError):
    """A peer's message we refuse; `code` is the grpc.StatusCode name to report back."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def bits(codec: WireCodec) -> int:
    """Bits one value takes in the payload."""
    return _BITS[codec]


def itemsize(codec: WireCodec) -> float:
    """Bytes one value takes in the payload: 0.5 for int4 (two values share a byte)."""
    return _BITS[codec] / 8


def payload_bytes(codec: WireCodec, shape: tuple[int, ...]) -> int:
    """Length of `data` for a tensor of `shape`: ceil(values * bits / 8)."""
    return -(-math.prod(shape) * _BITS[codec] // 8)


def n_scales(codec: WireCodec, shape: tuple[int, ...]) -> int:
    """fp32 scales a tensor of `shape` carries: none for the float codecs, one for int8, one per
    channel (the last dim) for the per-channel codecs."""
    if codec in _PER_CHANNEL:
        if not shape:
            raise ValueError(f"{codec.value} needs a tensor with at least one dim (the channels)")
        return shape[-1]
    return 1 if codec in _QMAX else 0


def _quantize(t: torch.Tensor, codec: WireCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 t -> (int8 q of t's shape, fp32 scales), on t's device. The one definition `encode`
    and `fake_quantize` share, written so every op is correctly rounded on any device (a divisor
    that is a Python number would make CUDA multiply by its reciprocal instead)."""
    qmax = _QMAX[codec]
    a = t.abs()
    amax = a.reshape(-1, t.shape[-1]).amax(dim=0) if codec in _PER_CHANNEL else a.amax().reshape(1)
    scale = (amax / torch.full_like(amax, qmax)).clamp(min=1e-30)
    q = torch.round(t / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def _pack4(q: torch.Tensor) -> bytes:
    """int8 values in [-7, 7] -> two's complement nibbles, two a byte, low nibble first."""
    nib = (q.reshape(-1) & 0x0F).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return (nib[0::2] | (nib[1::2] << 4)).numpy().tobytes()


def _unpack4(data: bytes, n: int) -> torch.Tensor:
    """Packed nibbles -> n int8 values in [-7, 7], or WireError (a -8, a non-zero padding)."""
    if not n:
        return torch.empty(0, dtype=torch.int8)
    packed = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    nib = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)
    if bool((nib == 8).any()):
        raise WireError("INVALID_ARGUMENT", "int4 value -8 (nibble 0b1000) outside [-7, 7]")
    if nib.numel() > n and int(nib[n]) != 0:
        raise WireError("INVALID_ARGUMENT", "int4 padding nibble of an odd count must be 0")
    v = nib[:n].to(torch.int8)
    return torch.where(v >= 8, v - 16, v)


def encode(t: torch.Tensor, codec: WireCodec) -> pb.Tensor:
    """(any float tensor, on any device, in any layout) -> pb.Tensor. Refuses non-finite
    values: we never send poison."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise WireError("INVALID_ARGUMENT", "refusing to send a tensor with NaN/Inf values")
    scales: list[float] = []
    if codec in _QMAX:
        q, scale = _quantize(t, codec)
        scales = scale.tolist()
        raw = _pack4(q) if codec is WireCodec.int4_channel else q.numpy().tobytes()
    else:
        raw = t.to(_FLOAT[codec]).reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(codec=_PB[codec], shape=list(t.shape), data=raw, scales=scales)


def fake_quantize(t: torch.Tensor, codec: WireCodec) -> torch.Tensor:
    """What a receiver decodes from `encode(t, codec)`, bit for bit, but with torch ops on t's
    device and no protobuf: fp32, t's shape and device. For training on what the wire carries.

    fp32 returns `t.float()` itself (its autograd graph included: the identity); the other codecs
    return values computed from `t.detach()`, no gradient: a trainer applies a straight-through
    gradient itself. Nothing is validated (that would sync the device): where `encode` or
    `decode` would refuse (NaN/Inf, an fp16 overflow, values past MAX_ABS) the values pass
    through as computed."""
    codec = WireCodec(codec)
    if codec is WireCodec.fp32:
        return t.float()
    x = t.detach().float()
    if codec in _FLOAT:
        return x.to(_FLOAT[codec]).float()
    q, scale = _quantize(x, codec)
    return q.float() * scale


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _field_bytes(length: int) -> int:
    """A length-delimited field of tag < 16 (packed repeated or bytes); absent when empty."""
    return 1 + _varint_bytes(length) + length if length else 0


def wire_bytes(codec: WireCodec, shape: tuple[int, ...]) -> int:
    """`encode(t, codec).ByteSize()` for a t of `shape`, without encoding: the pb.Tensor fields
    codec (never 0), shape (packed varints), data and scales (packed fp32); proto3 leaves out
    empty ones, and chunks/total_bytes are 0 until `split` chunks a message."""
    codec, shape = WireCodec(codec), tuple(int(d) for d in shape)
    return (
        1
        + _varint_bytes(_PB[codec])
        + _field_bytes(sum(_varint_bytes(d) for d in shape))
        + _field_bytes(payload_bytes(codec, shape))
        + _field_bytes(SCALE_BYTES * n_scales(codec, shape))
    )


MAX_ABS = 1e4  # boundary activations and gradients are O(1-100); anything past this is garbage


def decode(
    msg: pb.Tensor,
    expected_shape: tuple[int, ...],
    allowed: frozenset[WireCodec] | None = None,
) -> torch.Tensor:
    """pb.Tensor -> fp32 tensor of `expected_shape`, or WireError saying what is wrong."""
    codec = _FROM_PB.get(msg.codec)
    if codec is None:
        raise WireError("INVALID_ARGUMENT", f"unknown tensor codec {msg.codec}")
    if allowed is not None and codec not in allowed:
        names = sorted(c.value for c in allowed)
        raise WireError("INVALID_ARGUMENT", f"codec {codec.value} not accepted here (use {names})")
    shape = tuple(msg.shape)
    if shape != tuple(expected_shape):
        raise WireError(
            "INVALID_ARGUMENT", f"tensor shape {shape} != expected {tuple(expected_shape)}"
        )
    want = payload_bytes(codec, shape)
    if len(msg.data) != want:
        raise WireError(
            "INVALID_ARGUMENT",
            f"tensor payload is {len(msg.data)} bytes, {shape} {codec.value} needs {want}",
        )
    if codec in _QMAX:
        n = n_scales(codec, shape)
        if len(msg.scales) != n:
            raise WireError(
                "INVALID_ARGUMENT", f"{codec.value} needs {n} scales, got {len(msg.scales)}"
            )
        scale = torch.tensor(list(msg.scales), dtype=torch.float32)
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise WireError("INVALID_ARGUMENT", f"{codec.value} scales must be finite and >= 0")
        if codec is WireCodec.int4_channel:
            raw = _unpack4(msg.data, math.prod(shape)).reshape(shape)
        else:
            raw = _view(msg.data, torch.int8, shape)
        out = raw.float() * scale
    else:
        if msg.scales:
            raise WireError("INVALID_ARGUMENT", f"{codec.value} tensors carry no scales")
        out = _view(msg.data, _FLOAT[codec], shape).float()
    if not torch.isfinite(out).all():
        raise WireError("INVALID_ARGUMENT", "tensor has NaN/Inf values")
    if out.numel() and out.abs().max() > MAX_ABS:
        # finite but absurd: it would overflow the receiving stage (NaN grads, NaN outputs)
        raise WireError("INVALID_ARGUMENT", f"tensor values beyond +-{MAX_ABS:g}")
    return out


def _view(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
