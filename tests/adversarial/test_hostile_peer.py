"""#10: a hostile peer on the real wire (raw protobuf over gRPC, free to lie in every field)
against a real middle-stage node on loopback. Each test plays one attack from the issue's table
and shows that it fails: the node stays up, nothing of the attack is applied, honest peers go on.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from node.data import Batches, Corpus, MicrobatchId
from node.events import read_events
from node.guard import BANNED_PREFIX
from node.handshake import Handshake
from node.wire._pb import stage_pb2 as pb
from node.wire.codec import WireCodec
from node.wire.messages import Backward, ErrorReport, Notice, NoticeKind, to_pb
from tests.loopback.test_node_inputs import B, Peer, T, b, forward, hello_of, key

FP32 = WireCodec.fp32


async def linked(port: int, stage: int, fingerprint: str, peer_id: str) -> Peer:
    """A peer that completed its Hello (retrying while the node notices an earlier stream's
    end, as a real redial would)."""
    for _ in range(50):
        peer = Peer(port, peer_id)
        reply = await peer.hello(stage, fingerprint)
        if reply.WhichOneof("body") == "hello":
            return peer
        await peer.close()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{peer_id} could not link: {reply}")


async def data(peer: Peer) -> pb.LinkMessage:
    """The next forward or backward from the node (its notices, STEP_DONEs, are skipped)."""
    while True:
        msg = await peer.recv()
        if msg.WhichOneof("body") != "notice":
            return msg


async def run_step(node, up: Peer, down: Peer, batches: Batches, step: int, grad_scale=1.0):
    """One honest step through the node: 2 forwards down, 2 gradients up, STEP_DONE."""
    for i in range(2):
        await up.send(forward(batches, step, i))
        out = await data(down)
        assert out.WhichOneof("body") == "forward" and out.forward.id.step == step, out
    for i in range(2):
        grad = torch.randn(B, T, b) * grad_scale
        await down.send(to_pb(Backward(MicrobatchId(step, i), grad), FP32))
        back = await data(up)
        assert back.WhichOneof("body") == "backward", back
    await up.send(to_pb(Notice(NoticeKind.step_done, step, (0, 1), up.peer_id), FP32))
    for _ in range(200):
        if node.step > step:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"step {step} did not end")


def alive(node) -> bool:
    return not any(e["event"] == "exit" for e in read_events(node.cfg.events))


async def test_h7_a_hello_and_hang_up_does_not_stop_a_fixed_pipeline_node(node):
    batches = Batches(Corpus.load(), T, B, seed=0)
    up = await linked(node.port, 0, node.fingerprint, "up")
    down = await linked(node.port, 2, node.fingerprint, "down")
    await up.send(forward(batches, 0, 0))  # mid-step: the node has started
    assert (await data(down)).WhichOneof("body") == "forward"
    ghost = await linked(node.port, 0, node.fingerprint, "ghost")  # completes a Hello...
    await ghost.close()  # ...and hangs up
    await asyncio.sleep(0.5)  # the node sees the link close (nothing to wait on from outside)
    assert alive(node)
    # the step goes on with the honest peers
    await up.send(forward(batches, 0, 1))
    assert (await data(down)).forward.id.index == 1
    for i in range(2):
        await down.send(to_pb(Backward(MicrobatchId(0, i), torch.randn(B, T, b)), FP32))
        assert (await data(up)).WhichOneof("body") == "backward"
    await up.send(to_pb(Notice(NoticeKind.step_done, 0, (0, 1), up.peer_id), FP32))
    await run_step(node, up, down, batches, 1)
    assert alive(node) and node.step == 2
    for peer in (up, down):
        await peer.close()


async def test_h3_a_forged_ban_notice_does_not_stop_an_honest_middle_stage(node):
    """Downstream says "banned" for a forward we sent. Our forwards are activations (~1), the
    gradients we send upstream are ~1e-4 (as dL/dz of a mean loss is): judged against the
    gradients' median, every honest forward looked like garbage, and the node stopped."""
    batches = Batches(Corpus.load(), T, B, seed=0)
    up = await linked(node.port, 0, node.fingerprint, "up")
    down = await linked(node.port, 2, node.fingerprint, "down")
    for step in range(9):  # 18 tensors each way: past the outlier check's warm-up (16)
        await run_step(node, up, down, batches, step, grad_scale=1e-4)
    forged = ErrorReport(MicrobatchId(8, 1), "PERMISSION_DENIED", f"{BANNED_PREFIX}: trust me")
    await down.send(to_pb(forged, FP32))
    await asyncio.sleep(0.5)  # the node judges the notice (nothing to wait on from outside)
    assert alive(node)
    # the accuser's link is closed by the node; another replica of stage 2 carries on
    await down.close()
    down2 = await linked(node.port, 2, node.fingerprint, "down2")
    await run_step(node, up, down2, batches, 9, grad_scale=1e-4)
    assert alive(node) and node.step == 10
    for peer in (up, down2):
        await peer.close()


async def test_h5_l_a_flood_of_ids_and_a_hostile_node_id_are_refused(node):
    """A Notice with 100,000 ids (a million took 40 MB of a node's memory) is refused at decode; a
    node id with a newline (log injection) is refused at the Hello; the node goes on."""
    batches = Batches(Corpus.load(), T, B, seed=0)
    liar = Peer(node.port, claim="bad\nid [stage 0] INFO all is well")
    reply = await liar.hello(0, node.fingerprint)
    assert reply.WhichOneof("body") == "error" and "node id" in reply.error.message
    await liar.close()

    flood = await linked(node.port, 0, node.fingerprint, "flood")
    notice = pb.LinkMessage(notice=pb.Notice(kind=1, step=0, ids=[0] * 100_000, peer="flood"))
    await flood.send(notice)
    reply = await flood.recv()
    assert reply.WhichOneof("body") == "error" and reply.error.code == "INVALID_ARGUMENT", reply
    assert "ids" in reply.error.message
    await flood.close()
    up = await linked(node.port, 0, node.fingerprint, "up")
    down = await linked(node.port, 2, node.fingerprint, "down")
    await run_step(node, up, down, batches, 0)
    assert alive(node) and node.step == 1
    for peer in (up, down):
        await peer.close()


async def test_h4_labels_come_from_the_seeded_draw_not_from_a_peers_offsets(last_node):
    """The last stage took its targets from the offsets upstream sent (only range-checked): a
    peer could train the model on any labels. Now it draws them again from (seed, step, index)
    and refuses, as garbage, offsets that differ."""
    node = last_node
    batches = Batches(Corpus.load(), T, B, seed=0)
    before = {n: p.clone() for n, p in node.runtime.stage.named_parameters()}
    liar = await linked(node.port, node.k - 1, node.fingerprint, "liar")
    poisoned = forward(batches, 0, 0)
    poisoned.forward.offsets[0] += 1  # inside the corpus, so the range check passes
    await liar.send(poisoned)
    reply = await liar.recv()
    assert reply.WhichOneof("body") == "error" and reply.error.code == "INVALID_ARGUMENT", reply
    assert "seeded draw" in reply.error.message
    await liar.close()
    assert [p for p, _ in node.peers.bans] == [liar.peer_id]
    assert not node.runtime.pending
    for n, p in node.runtime.stage.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    # an honest upstream's step goes through: the last stage sends gradients back
    up = await linked(node.port, node.k - 1, node.fingerprint, "up")
    for i in range(2):
        await up.send(forward(batches, 0, i))
        assert (await data(up)).WhichOneof("body") == "backward"
    await up.send(to_pb(Notice(NoticeKind.step_done, 0, (0, 1), up.peer_id), FP32))
    for _ in range(200):
        if node.step == 1:
            break
        await asyncio.sleep(0.02)
    assert node.step == 1 and alive(node)
    await up.close()


async def test_bytes_that_do_not_parse_get_invalid_argument_and_the_node_goes_on(node):
    """Undecodable requests came back as UNKNOWN (Diagnostics), and on Stage/Link ended the
    call with OK. Now: INVALID_ARGUMENT with a reason; after a Hello, a refusal and a ban, as
    for any garbage."""
    garbage = b"\xff\xff\xff\xff not a protobuf"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        ping = channel.unary_unary("/resbm.v1.Diagnostics/Ping")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ping(garbage, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        link = channel.stream_stream("/resbm.v1.Stage/Link")()
        await link.write(garbage)  # instead of a Hello
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(link.read(), 10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected a Hello" in err.value.details()
        # after a good Hello, on the same raw stream
        rogue = channel.stream_stream("/resbm.v1.Stage/Link")()
        hs = Handshake(key("rogue"), 0, node.fingerprint)
        await rogue.write(to_pb(hs.offer(), FP32).SerializeToString())
        reply = pb.LinkMessage.FromString(await asyncio.wait_for(rogue.read(), 10))
        assert reply.WhichOneof("body") == "hello"
        await rogue.write(to_pb(hs.prove(hello_of(reply)), FP32).SerializeToString())
        await rogue.write(garbage)
        reply = pb.LinkMessage.FromString(await asyncio.wait_for(rogue.read(), 10))
        assert reply.error.code == "INVALID_ARGUMENT" and "does not parse" in reply.error.message
        rogue.cancel()
    for _ in range(100):
        if node.peers.bans:
            break
        await asyncio.sleep(0.02)
    assert [p for p, _ in node.peers.bans] == [key("rogue").node_id]
    batches = Batches(Corpus.load(), T, B, seed=0)
    up = await linked(node.port, 0, node.fingerprint, "up")
    down = await linked(node.port, 2, node.fingerprint, "down")
    await run_step(node, up, down, batches, 0)
    assert alive(node)
    for peer in (up, down):
        await peer.close()


async def test_h5_links_are_capped_per_host_handshakes_included(node):
    """A flood of links that never say Hello (each holds buffers) is refused past
    limits.max_links_per_host, before anything is read; honest peers link once they are gone."""
    cap = node.peers.guard.limits.max_links_per_host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        calls = [channel.stream_stream("/resbm.v1.Stage/Link")() for _ in range(cap)]
        for call in calls:
            await call.wait_for_connection()  # the call is open; no Hello comes
        for _ in range(200):
            if sum(node.peers._handshakes.values()) == cap:
                break
            await asyncio.sleep(0.02)
        extra = channel.stream_stream("/resbm.v1.Stage/Link")()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(extra.read(), 10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_links_per_host" in err.value.details()
        for call in calls:
            call.cancel()
    batches = Batches(Corpus.load(), T, B, seed=0)
    up = await linked(node.port, 0, node.fingerprint, "up")
    down = await linked(node.port, 2, node.fingerprint, "down")
    await run_step(node, up, down, batches, 0)
    # an attached link counts once, as a live link (review: it also stayed a handshake)
    assert not node.peers._handshakes
    for peer in (up, down):
        await peer.close()


async def test_h5_an_outbox_to_a_peer_that_does_not_read_is_bounded():
    """A peer that stops reading (gRPC flow control then holds our writes) must not hold our
    memory without bound: past limits.max_outbox_mb the link closes."""
    from node.transport.link import Link, LinkClosed, LinkSettings
    from node.wire.messages import Forward

    class Stuck:  # a stream whose writes never complete
        async def write(self, msg):
            await asyncio.Event().wait()

        async def read(self):
            await asyncio.Event().wait()

    settings = LinkSettings(codec=FP32, max_outbox_bytes=64 << 10)
    link = Link(Stuck(), settings, (B, T, b), B, "stuck")
    link.start()
    batches = Batches(Corpus.load(), T, B, seed=0)
    mb = batches.microbatch(0, 0)
    posted = 0
    with pytest.raises(LinkClosed, match="max_outbox_mb"):
        for _ in range(1000):
            link.post(Forward(mb.id, torch.randn(B, T, b), mb.offsets, mb.fingerprint))
            posted += 1
    assert link.closed.is_set() and 0 < posted < 200  # ~0.5 KB each: 64 KB is ~120
    await link.aclose()


async def test_l_a_server_bounds_calls_and_drops_idle_connections():
    """#10 L: no limit on concurrent calls or idle connections. Now a Stage server runs at most
    `max_rpcs` calls (then RESOURCE_EXHAUSTED) and closes a connection idle (no call) for
    `max_idle_connection_s`."""
    from node.transport.link import LinkSettings
    from node.transport.server import start_server

    entered = []

    async def hold(context) -> None:
        entered.append(1)
        await asyncio.sleep(30)

    settings = LinkSettings(codec=FP32, max_rpcs=2, max_idle_connection_s=0.5)
    server, port = await start_server("127.0.0.1:0", hold, settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = [channel.stream_stream("/resbm.v1.Stage/Link")() for _ in range(2)]
            for call in calls:
                await asyncio.wait_for(call.wait_for_connection(), 10)
            for _ in range(200):
                if len(entered) == 2:  # both are running in the server
                    break
                await asyncio.sleep(0.02)
            calls.append(channel.stream_stream("/resbm.v1.Stage/Link")())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(calls[2].read(), 10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as idle:
            await asyncio.wait_for(idle.channel_ready(), 10)
            for _ in range(100):  # the server's GOAWAY takes the channel out of READY
                if idle.get_state() != grpc.ChannelConnectivity.READY:
                    break
                await asyncio.sleep(0.05)
            assert idle.get_state() != grpc.ChannelConnectivity.READY
    finally:
        await server.stop(grace=0)
