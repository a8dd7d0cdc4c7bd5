"""A real middle-stage node on loopback, fed by raw gRPC peers: every bad input gets its status,
nothing of it is applied, and the node goes on to train a correct step."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import torch

from node.daemon import StageNode
from node.data import Batches, Corpus, MicrobatchId
from node.events import read_events
from node.node_config import NodeConfig
from node.version import VERSION
from node.wire._pb import stage_pb2 as pb
from node.wire._pb import stage_pb2_grpc as pb_grpc
from node.wire.codec import WireCodec
from node.wire.messages import Backward, Forward, Hello, Notice, NoticeKind, to_pb

MODEL = {
    "d_model": 64,
    "n_heads": 2,
    "n_layers": 3,
    "n_stages": 3,
    "seq_len": 16,
    "compression": 16,
}
B, T, b = 2, 16, 4


class Peer:
    """A hand-driven neighbour: raw protobuf in and out, so we can send anything."""

    def __init__(self, port: int):
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)]
        )
        self.call = pb_grpc.StageStub(self.channel).Link()

    async def hello(self, stage: int, fingerprint: str) -> pb.LinkMessage:
        peer_id = f"test-{id(self):x}"  # every hand-driven peer is its own node
        await self.send(to_pb(Hello(stage, fingerprint, peer_id, VERSION), WireCodec.fp32))
        return await self.recv()

    async def send(self, msg: pb.LinkMessage) -> None:
        await asyncio.wait_for(self.call.write(msg), 10)

    async def recv(self) -> pb.LinkMessage:
        return await asyncio.wait_for(self.call.read(), 30)

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture
async def node(tmp_path):
    cfg = NodeConfig(
        stage=1,
        listen="127.0.0.1:0",
        model=MODEL,
        batch_size=B,
        microbatches=2,
        steps=100,
        wire_codec="fp32",
        events=tmp_path / "events.jsonl",
        threads=1,
        max_message_mb=0.25,
    )
    n = StageNode(cfg)
    task = asyncio.create_task(n.run())
    for _ in range(200):
        if n.port:
            break
        await asyncio.sleep(0.05)
    assert n.port, "node did not start"
    yield n
    n.request_stop()
    assert await asyncio.wait_for(task, 30) == 0  # a stop signal is a clean exit
    assert not any(t for t in n.peers._tasks if not t.done()), "node left tasks running"


def forward(
    batches: Batches,
    step: int,
    index: int,
    z: torch.Tensor | None = None,
    codec: WireCodec = WireCodec.fp32,
) -> pb.LinkMessage:
    mb = batches.microbatch(step, index)
    z = torch.randn(B, T, b) if z is None else z
    return to_pb(Forward(mb.id, z, mb.offsets, mb.fingerprint), codec)


def error_of(msg: pb.LinkMessage) -> tuple[str, tuple[int, int]]:
    assert msg.WhichOneof("body") == "error", msg
    return msg.error.code, (msg.error.id.step, msg.error.id.index)


async def test_bad_inputs_get_clear_statuses_and_the_node_keeps_training(node):
    batches = Batches(Corpus.load(), T, B, seed=0)

    # an oversized message kills only that stream, with RESOURCE_EXHAUSTED
    rogue = Peer(node.port)
    assert (await rogue.hello(0, node.fingerprint)).WhichOneof("body") == "hello"
    await rogue.send(forward(batches, 0, 0, torch.randn(B, T, 4096)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rogue.recv()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await rogue.close()

    # a peer with another swarm config is refused at the handshake
    stranger = Peer(node.port)
    reply = await stranger.hello(0, "not-our-swarm")
    assert reply.error.code == "FAILED_PRECONDITION" and "mismatch" in reply.error.message
    await stranger.close()

    up, down = Peer(node.port), Peer(node.port)
    for _ in range(50):  # the node notices the rogue stream's end asynchronously
        reply = await up.hello(0, node.fingerprint)
        if reply.WhichOneof("body") == "hello":
            break
        await up.close()
        await asyncio.sleep(0.1)
        up = Peer(node.port)
    assert reply.WhichOneof("body") == "hello"
    assert (await down.hello(2, node.fingerprint)).WhichOneof("body") == "hello"

    before = {n: p.clone() for n, p in node.runtime.stage.named_parameters()}
    wrong_shape = forward(batches, 0, 0, torch.randn(B, T, b + 1))
    wrong_dtype = forward(batches, 0, 0, codec=WireCodec.fp16)
    truncated = forward(batches, 0, 0)
    truncated.forward.z.data = truncated.forward.z.data[:-3]
    nan = forward(batches, 0, 0)
    raw = torch.randn(B, T, b)
    raw[0, 0, 0] = float("nan")
    nan.forward.z.CopyFrom(pb.Tensor(codec=pb.FP32, shape=[B, T, b], data=raw.numpy().tobytes()))
    wrong_step = forward(batches, 7, 0)
    bad_offsets = forward(batches, 0, 0)
    bad_offsets.forward.offsets[0] = 10**9
    other_corpus = forward(batches, 0, 0)
    other_corpus.forward.data_fingerprint = "0123456789abcdef"
    cases = [
        (wrong_shape, "INVALID_ARGUMENT", "shape"),
        (wrong_dtype, "INVALID_ARGUMENT", "codec fp16"),
        (truncated, "INVALID_ARGUMENT", "payload"),
        (nan, "INVALID_ARGUMENT", "NaN"),
        (wrong_step, "FAILED_PRECONDITION", "step 0"),
        (bad_offsets, "INVALID_ARGUMENT", "offsets"),
        (other_corpus, "FAILED_PRECONDITION", "--data"),
    ]
    for msg, code, needle in cases:
        await up.send(msg)
        reply = await up.recv()
        assert error_of(reply)[0] == code, (needle, reply)
        assert needle in reply.error.message

    # a backward for a microbatch this node never forwarded
    await down.send(to_pb(Backward(MicrobatchId(0, 1), torch.randn(B, T, b)), WireCodec.fp32))
    assert error_of(await down.recv()) == ("NOT_FOUND", (0, 1))

    # nothing of it was applied: no forward pending, nothing kept, weights and grads untouched
    assert not node.runtime.pending and not node.ledger.z_in and node.step == 0
    for n, p in node.runtime.stage.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n

    # nothing of the above was applied: a correct step now runs end to end
    sent = {}
    for i in range(2):
        z = torch.randn(B, T, b)
        await up.send(forward(batches, 0, i, z))
        out = await down.recv()
        assert out.WhichOneof("body") == "forward" and out.forward.id.index == i
        assert tuple(out.forward.z.shape) == (B, T, b)
        sent[i] = out
    # until the step's flush the node keeps what a replay would need
    assert set(node.ledger.z_in) == {0, 1}
    await up.send(forward(batches, 0, 0))  # a duplicate of a microbatch in flight
    assert error_of(await up.recv()) == ("ALREADY_EXISTS", (0, 0))
    for i in range(2):
        await down.send(to_pb(Backward(MicrobatchId(0, i), torch.randn(B, T, b)), WireCodec.fp32))
        back = await up.recv()
        assert back.WhichOneof("body") == "backward" and back.backward.id.index == i
        grad = torch.frombuffer(bytearray(back.backward.grad.data), dtype=torch.float32)
        assert grad.numel() == B * T * b and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the step ends when upstream says all its microbatches are done
    await up.send(to_pb(Notice(NoticeKind.step_done, 0, (0, 1), "up"), WireCodec.fp32))

    for _ in range(100):
        steps = [e for e in read_events(node.cfg.events) if e["event"] == "step"]
        if steps:
            break
        await asyncio.sleep(0.05)
    assert [e["step"] for e in steps] == [0]
    assert node.step == 1 and not node.runtime.pending
    assert not node.ledger.z_in and not node.ledger.grad_out  # a fresh ledger for step 1
    assert node.prev_ledger.step == 0 and set(node.prev_ledger.grad_out) == {0, 1}  # kept a step
    assert dict(node.errors) == {
        "INVALID_ARGUMENT": 5,
        "FAILED_PRECONDITION": 2,
        "NOT_FOUND": 1,
        "ALREADY_EXISTS": 1,
    }
    for peer in (up, down):
        with contextlib.suppress(Exception):
            await peer.close()


async def test_torch_runs_off_the_event_loop_thread(node):
    import threading

    name = await node._compute(lambda: threading.current_thread().name)
    assert name.startswith("stage1-compute") and name != threading.current_thread().name
