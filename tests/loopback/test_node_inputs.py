"""A real middle-stage node on loopback, fed by raw gRPC peers: every bad input gets its status,
nothing of it is applied, and the node goes on to train a correct step."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import grpc
import pytest
import torch

from common.identity import Identity
from node.daemon import StageNode
from node.data import Batches, Corpus, MicrobatchId
from node.events import read_events
from node.handshake import Handshake
from node.node_config import NodeConfig
from node.wire._pb import stage_pb2 as pb
from node.wire._pb import stage_pb2_grpc as pb_grpc
from node.wire.codec import WireCodec
from node.wire.messages import Backward, Forward, Hello, Notice, NoticeKind, from_pb, to_pb
from tests.helpers import key

MODEL = {
    "d_model": 64,
    "n_heads": 2,
    "n_layers": 3,
    "n_stages": 3,
    "seq_len": 16,
    "compression": 16,
}
B, T, b = 2, 16, 4


def hello_of(msg: pb.LinkMessage) -> Hello:
    return from_pb(msg, (B, T, b), B)  # decoded and checked as a node does


class Peer:
    """A hand-driven neighbour: raw protobuf in and out, so we can send anything. It holds a
    real key (a named one per `name`); `claim` makes it say it is another id than its key's."""

    def __init__(
        self,
        port: int,
        name: str | None = None,
        claim: str | None = None,
        identity: Identity | None = None,
    ):
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)]
        )
        self.call = pb_grpc.StageStub(self.channel).Link()
        self.identity = identity or (key(name) if name else Identity.generate())
        self.peer_id = claim or self.identity.node_id

    async def hello(self, stage: int, fingerprint: str) -> pb.LinkMessage:
        """The signed handshake (node/handshake.py) as a dialer: the node's answer (or its
        refusal); the proof is sent when the node answered."""
        hs = Handshake(self.identity, stage, fingerprint)
        await self.send(to_pb(replace(hs.offer(), peer_id=self.peer_id), WireCodec.fp32))
        reply = await self.recv()
        if reply.WhichOneof("body") == "hello":
            proof = replace(hs.prove(hello_of(reply)), peer_id=self.peer_id)
            await self.send(to_pb(proof, WireCodec.fp32))
        return reply

    async def send(self, msg: pb.LinkMessage) -> None:
        await asyncio.wait_for(self.call.write(msg), 10)

    async def recv(self) -> pb.LinkMessage:
        return await asyncio.wait_for(self.call.read(), 30)

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@contextlib.asynccontextmanager
async def running_node(tmp_path, stage: int):
    """A real node of `stage` (of 3, a fixed pipeline) on loopback, stopped cleanly after."""
    cfg = NodeConfig(
        stage=stage,
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


@pytest.fixture
async def node(tmp_path):
    async with running_node(tmp_path, 1) as n:
        yield n


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


async def banned(peer: Peer, node) -> str:
    """The node's ban notice to `peer`, then the end of its stream; returns the notice."""
    reply = await peer.recv()
    assert reply.WhichOneof("body") == "error" and reply.error.code == "PERMISSION_DENIED", reply
    assert reply.error.message.startswith("banned for"), reply.error.message
    for _ in range(5):  # the node closes the stream after its notice
        try:
            end = await peer.recv()
        except grpc.aio.AioRpcError:
            break
        if end is grpc.aio.EOF:
            break
    else:
        pytest.fail("the banned peer's stream stayed open")
    await peer.close()
    again = Peer(node.port, identity=peer.identity)  # a redial of the banned node is refused
    reply_again = await again.hello(0, node.fingerprint)
    assert (
        reply_again.error.code == "PERMISSION_DENIED" and "banned for" in reply_again.error.message
    )
    await again.close()
    return reply.error.message


async def test_bad_inputs_get_clear_statuses_garbage_bans_and_the_node_keeps_training(node):
    batches = Batches(Corpus.load(), T, B, seed=0)

    # over the largest message a node reads (a chunk and its framing): gRPC refuses it from
    # its length prefix, unread, and ends that stream
    rogue = Peer(node.port)
    assert (await rogue.hello(0, node.fingerprint)).WhichOneof("body") == "hello"
    await rogue.send(forward(batches, 0, 0, torch.randn(B, T, 24000)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rogue.recv()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await rogue.close()

    # a peer with another swarm config is refused at the handshake
    stranger = Peer(node.port)
    reply = await stranger.hello(0, "not-our-swarm")
    assert reply.error.code == "FAILED_PRECONDITION" and "mismatch" in reply.error.message
    await stranger.close()

    before = {n: p.clone() for n, p in node.runtime.stage.named_parameters()}
    # garbage: refused with its reason, then the sender is banned (and told, and cut off)
    wrong_shape = forward(batches, 0, 0, torch.randn(B, T, b + 1))
    wrong_dtype = forward(batches, 0, 0, codec=WireCodec.fp16)
    truncated = forward(batches, 0, 0)
    truncated.forward.z.data = truncated.forward.z.data[:-3]
    nan = forward(batches, 0, 0)
    raw = torch.randn(B, T, b)
    raw[0, 0, 0] = float("nan")
    nan.forward.z.CopyFrom(pb.Tensor(codec=pb.FP32, shape=[B, T, b], data=raw.numpy().tobytes()))
    out_of_bound = forward(batches, 0, 0, torch.randn(B, T, b) * 1e6)
    bad_offsets = forward(batches, 0, 0)
    bad_offsets.forward.offsets[0] = 10**9
    garbage = [
        (wrong_shape, "INVALID_ARGUMENT", "shape"),
        (wrong_dtype, "INVALID_ARGUMENT", "codec fp16"),
        (truncated, "INVALID_ARGUMENT", "payload"),
        (nan, "INVALID_ARGUMENT", "NaN"),
        (out_of_bound, "INVALID_ARGUMENT", "beyond"),
        (bad_offsets, "INVALID_ARGUMENT", "offsets"),
    ]
    for n, (msg, code, needle) in enumerate(garbage):
        rogue = Peer(node.port, f"rogue-{n}")
        for _ in range(50):  # the node notices an earlier stream's end asynchronously
            reply = await rogue.hello(0, node.fingerprint)
            if reply.WhichOneof("body") == "hello":
                break
            await rogue.close()
            await asyncio.sleep(0.1)
            rogue = Peer(node.port, f"rogue-{n}")
        assert reply.WhichOneof("body") == "hello", reply
        await rogue.send(msg)
        reply = await rogue.recv()
        assert reply.WhichOneof("body") == "error" and reply.error.code == code, (needle, reply)
        assert needle in reply.error.message, (needle, reply.error.message)
        assert reply.error.message in await banned(rogue, node)  # the ban names the reason
    rogues = [key(f"rogue-{n}").node_id for n in range(len(garbage))]
    assert [peer for peer, _ in node.peers.bans] == rogues

    # races between honest peers are refused but never banned
    up, down = Peer(node.port), Peer(node.port)
    for _ in range(50):
        reply = await up.hello(0, node.fingerprint)
        if reply.WhichOneof("body") == "hello":
            break
        await up.close()
        await asyncio.sleep(0.1)
        up = Peer(node.port)
    assert reply.WhichOneof("body") == "hello"
    assert (await down.hello(2, node.fingerprint)).WhichOneof("body") == "hello"
    wrong_step = forward(batches, 7, 0)
    other_corpus = forward(batches, 0, 0)
    other_corpus.forward.data_fingerprint = "0123456789abcdef"
    for msg, code, needle in [
        (wrong_step, "FAILED_PRECONDITION", "step 0"),
        (other_corpus, "FAILED_PRECONDITION", "--data"),
    ]:
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
    prev = node.state.prev_ledger
    assert prev.step == 0 and set(prev.grad_out) == {0, 1}  # kept a step
    assert dict(node.errors) == {
        "INVALID_ARGUMENT": 6,
        "banned": 6,
        "FAILED_PRECONDITION": 2,
        "NOT_FOUND": 1,
        "ALREADY_EXISTS": 1,
    }
    for peer in (up, down):
        with contextlib.suppress(Exception):
            await peer.close()


async def test_torch_runs_off_the_event_loop_thread(node):
    import threading

    name = await node._on_compute(lambda: threading.current_thread().name)
    assert name.startswith("stage1-compute") and name != threading.current_thread().name
