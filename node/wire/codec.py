"""Tensor <-> wire bytes, and the validation every received tensor goes through.

Codecs: fp32 (exact; the equivalence tests use it), bf16 (default), fp16, and symmetric int8 with
one scale per tensor or per channel. A per-token scale is deliberately absent: at b=2 channels one
fp32 scale per token would make the message bigger than bf16.

Nothing a peer sends is trusted: codec, shape, byte length, scales and finiteness are all checked
before a tensor reaches the model, and a failure is a WireError carrying the gRPC status name that
the node reports back to the sender.
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
}
_FROM_PB = {v: k for k, v in _PB.items()}
_DTYPE = {
    WireCodec.fp32: torch.float32,
    WireCodec.bf16: torch.bfloat16,
    WireCodec.fp16: torch.float16,
    WireCodec.int8: torch.int8,
    WireCodec.int8_channel: torch.int8,
}


class WireError(ValueError):
    """A peer's message we refuse; `code` is the grpc.StatusCode name to report back."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def itemsize(codec: WireCodec) -> int:
    return _DTYPE[codec].itemsize


def payload_bytes(codec: WireCodec, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * itemsize(codec)


def encode(t: torch.Tensor, codec: WireCodec) -> pb.Tensor:
    """(any float tensor, on any device, in any layout) -> pb.Tensor. Refuses non-finite
    values: we never send poison."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise WireError("INVALID_ARGUMENT", "refusing to send a tensor with NaN/Inf values")
    scales: list[float] = []
    if codec in (WireCodec.int8, WireCodec.int8_channel):
        if codec is WireCodec.int8:
            amax = t.abs().max().reshape(1)
        else:
            amax = t.abs().reshape(-1, t.shape[-1]).amax(dim=0)
        scale = (amax / 127.0).clamp(min=1e-30)
        q = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
        scales, raw = scale.tolist(), q.numpy().tobytes()
    else:
        raw = t.to(_DTYPE[codec]).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(codec=_PB[codec], shape=list(t.shape), data=raw, scales=scales)


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
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if want else None
    if flat is None:
        raw = torch.empty(shape, dtype=_DTYPE[codec])
    else:
        raw = flat.view(_DTYPE[codec]).reshape(shape)
    if codec in (WireCodec.int8, WireCodec.int8_channel):
        n_scales = 1 if codec is WireCodec.int8 else shape[-1]
        if len(msg.scales) != n_scales:
            raise WireError(
                "INVALID_ARGUMENT", f"{codec.value} needs {n_scales} scales, got {len(msg.scales)}"
            )
        scale = torch.tensor(list(msg.scales), dtype=torch.float32)
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise WireError("INVALID_ARGUMENT", "int8 scales must be finite and >= 0")
        out = raw.float() * scale
    else:
        if msg.scales:
            raise WireError("INVALID_ARGUMENT", f"{codec.value} tensors carry no scales")
        out = raw.float()
    if not torch.isfinite(out).all():
        raise WireError("INVALID_ARGUMENT", "tensor has NaN/Inf values")
    if out.numel() and out.abs().max() > MAX_ABS:
        # finite but absurd: it would overflow the receiving stage (NaN grads, NaN outputs)
        raise WireError("INVALID_ARGUMENT", f"tensor values beyond +-{MAX_ABS:g}")
    return out
