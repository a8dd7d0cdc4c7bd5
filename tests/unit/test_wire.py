"""Wire codecs, validation of untrusted tensors, chunking, and the committed protobuf stubs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.data import MicrobatchId
from node.wire._pb import stage_pb2 as pb
from node.wire.codec import WireCodec, WireError, decode, encode, payload_bytes
from node.wire.messages import (
    Backward,
    Forward,
    MessageError,
    Reassembler,
    from_pb,
    split,
    to_pb,
    wire_size,
)

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (4, 8, 2)


@pytest.mark.parametrize("codec", list(WireCodec))
def test_round_trip_of_every_codec(codec):
    torch.manual_seed(0)
    t = torch.randn(SHAPE) * 3
    back = decode(encode(t, codec), SHAPE)
    assert back.dtype == torch.float32 and back.shape == SHAPE
    tol = {"fp32": 0.0, "bf16": 2e-2, "fp16": 2e-3, "int8": 1e-2, "int8-channel": 1e-2}
    tol["int4-channel"] = 1 / 14  # half a step of amax/7
    rel = (back - t).abs().max() / t.abs().max()
    assert rel <= tol[codec.value], (codec, rel)
    if codec is WireCodec.fp32:
        assert torch.equal(back, t)


def test_payload_sizes_are_what_the_link_pays_for():
    assert len(encode(torch.zeros(SHAPE), WireCodec.bf16).data) == 64 * 2
    assert len(encode(torch.zeros(SHAPE), WireCodec.int8).data) == 64
    assert payload_bytes(WireCodec.fp32, SHAPE) == 256
    # per-channel int8 adds one fp32 scale per channel, not per token
    assert len(encode(torch.ones(SHAPE), WireCodec.int8_channel).scales) == 2


def test_per_channel_int8_keeps_small_channels():
    t = torch.stack([torch.randn(4, 8) * 1000, torch.randn(4, 8) * 1e-3], dim=-1)
    per_tensor = decode(encode(t, WireCodec.int8), SHAPE)
    per_channel = decode(encode(t, WireCodec.int8_channel), SHAPE)
    small = t[..., 1]
    assert (per_channel[..., 1] - small).abs().max() < 0.02 * small.abs().max()
    assert torch.count_nonzero(per_tensor[..., 1]) == 0  # swamped by the big channel


def _bad(**changes) -> pb.Tensor:
    msg = encode(torch.randn(SHAPE), WireCodec.bf16)
    for k, v in changes.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)
        else:
            setattr(msg, k, v)
    return msg


@pytest.mark.parametrize(
    "msg,needle",
    [
        (_bad(shape=[4, 8, 3]), "shape (4, 8, 3) != expected (4, 8, 2)"),
        (_bad(data=b"\x00" * 10), "payload is 10 bytes"),
        (_bad(codec=99), "unknown tensor codec"),
        (_bad(codec=pb.FP32), "payload is 128 bytes"),
        (encode(torch.randn(SHAPE), WireCodec.fp16), "codec fp16 not accepted here"),
    ],
)
def test_bad_tensors_are_refused_with_invalid_argument(msg, needle):
    with pytest.raises(WireError) as err:
        decode(msg, SHAPE, frozenset({WireCodec.bf16, WireCodec.fp32}))
    assert err.value.code == "INVALID_ARGUMENT"
    assert needle in str(err.value)


def test_nan_and_inf_are_refused_both_ways():
    t = torch.randn(SHAPE)
    t[0, 0, 0] = float("nan")
    with pytest.raises(WireError, match="NaN"):
        encode(t, WireCodec.bf16)
    raw = torch.randn(SHAPE).to(torch.bfloat16)
    raw[1, 2, 1] = float("inf")
    msg = pb.Tensor(codec=pb.BF16, shape=list(SHAPE), data=raw.view(torch.uint8).numpy().tobytes())
    with pytest.raises(WireError, match="NaN/Inf"):
        decode(msg, SHAPE)
    bad_scale = encode(torch.randn(SHAPE), WireCodec.int8)
    bad_scale.scales[0] = float("nan")
    with pytest.raises(WireError, match="scales"):
        decode(bad_scale, SHAPE)


def test_message_errors_name_the_microbatch():
    mid = MicrobatchId(3, 1)
    msg = to_pb(Backward(mid, torch.randn(4, 8, 3)), WireCodec.bf16)
    with pytest.raises(MessageError) as err:
        from_pb(msg, SHAPE, batch_size=4)
    assert err.value.id == mid and err.value.code == "INVALID_ARGUMENT"
    fwd = to_pb(Forward(mid, torch.randn(SHAPE), torch.arange(3), "fp"), WireCodec.bf16)
    with pytest.raises(MessageError, match="3 sample offsets, expected 4"):
        from_pb(fwd, SHAPE, batch_size=4)


def test_big_tensors_travel_in_chunks_and_reassemble_exactly():
    t = torch.randn(4, 64, 256)
    msg = to_pb(Forward(MicrobatchId(0, 0), t, torch.arange(4), "fp"), WireCodec.fp32)
    parts = split(msg, chunk_bytes=10_000)
    assert len(parts) == 1 + -(-t.numel() * 4 // 10_000)
    assert all(wire_size(p) < 11_000 for p in parts)
    r = Reassembler(max_tensor_bytes=1 << 20)
    outs = [r.feed(p) for p in parts]
    assert outs[:-1] == [None] * (len(parts) - 1)
    back = from_pb(outs[-1], (4, 64, 256), batch_size=4)
    assert torch.equal(back.z, t)


def test_reassembler_refuses_oversized_and_out_of_order_chunks():
    t = torch.randn(4, 64, 256)
    parts = split(to_pb(Backward(MicrobatchId(0, 0), t), WireCodec.fp32), chunk_bytes=10_000)
    with pytest.raises(WireError) as err:
        Reassembler(max_tensor_bytes=100_000).feed(parts[0])
    assert err.value.code == "RESOURCE_EXHAUSTED"
    r = Reassembler(1 << 20)
    r.feed(parts[0])
    with pytest.raises(WireError, match="out of order"):
        r.feed(parts[2])
    with pytest.raises(WireError, match="without a preceding"):
        Reassembler(1 << 20).feed(parts[1])


def _strip(text: str) -> str:
    """Drop the generator's version stamps (they differ between grpcio-tools releases)."""
    stamps = ("# Protobuf Python Version", "GRPC_GENERATED_VERSION")
    lines = [ln for ln in text.splitlines() if not ln.startswith(stamps)]
    return re.sub(r"\n\s*\d+,(?=\n)", "", "\n".join(lines))


PROTOS = ("stage", "coordinator", "diagnostics")  # proto/*.proto, compiled by `make proto`


def test_committed_protobuf_stubs_match_proto_source(tmp_path):
    """Stubs are committed (no build step at install); this fails when they are stale."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Inode/wire/_pb={ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(str(ROOT / "proto" / f"{proto}.proto") for proto in PROTOS),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    for name in (
        f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
    ):
        fresh = (tmp_path / "node/wire/_pb" / name).read_text()
        committed = (ROOT / "node/wire/_pb" / name).read_text()
        assert _strip(fresh) == _strip(committed), (
            f"node/wire/_pb/{name} is stale: run `make proto`"
        )


def test_link_deadlines_grow_with_bytes_and_options_are_explicit():
    from node.transport.link import LinkSettings, channel_options, server_options

    s = LinkSettings(min_bandwidth_bps=1e6, base_timeout_s=10, max_message_bytes=1 << 20)
    assert s.timeout_for(0) == 10
    assert s.timeout_for(1_000_000) == pytest.approx(18)  # 8 Mbit at 1 Mbit/s, plus slack
    opts = dict(server_options(s))
    # what every node reads: a peer's largest chunk (128 KiB) and its framing, whatever our
    # own max_message_mb (a server's memory under a flood grows with the messages it reads)
    assert opts["grpc.max_receive_message_length"] == (128 << 10) + (64 << 10)
    assert opts["grpc.max_send_message_length"] == 1 << 20
    assert opts["grpc.keepalive_time_ms"] == 20_000
    assert opts["grpc.keepalive_timeout_ms"] == 10_000
    assert opts["grpc.so_reuseport"] == 0
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" in opts
    assert dict(channel_options(s))["grpc.keepalive_permit_without_calls"] == 1


def test_every_notice_kind_round_trips_and_an_unknown_one_is_refused():
    """FORWARDED (0.11, #11) travels as the other notices do; a kind this version does not
    know is refused by name, not taken for one it knows."""
    from node.wire.messages import Notice, NoticeKind, from_pb, to_pb

    for kind in NoticeKind:
        msg = Notice(kind, 7, (0, 3), "peer")
        assert from_pb(to_pb(msg, WireCodec.fp32), (2, 8, 4), 2) == msg
    bad = pb.LinkMessage(notice=pb.Notice(kind=max(NoticeKind) + 1, step=0, ids=[0]))
    with pytest.raises(WireError, match="bad notice"):
        from_pb(bad, (2, 8, 4), 2)
