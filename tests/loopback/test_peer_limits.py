"""Per-peer limits on a real link (node/peering.py + node/guard.py): a peer that sends faster than
the node works is held back by not reading its stream (nothing is refused, nothing lost), and a
peer whose activations are outliers against what the link has carried is banned."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest
import torch

from common.identity import Identity
from node.data import MicrobatchId
from node.handshake import Handshake
from node.ops_config import PeerLimits
from node.peering import LinkDown, LinkUp, Neighbours
from node.transport.link import Link, LinkSettings
from node.transport.server import dial
from node.wire.codec import WireCodec
from node.wire.messages import ErrorReport, Forward, Hello, Notice, NoticeKind

pytestmark = pytest.mark.loopback
SHAPE = (2, 8, 4)
FP = "0123456789abcdef"


async def serving(limits: PeerLimits, shape=SHAPE) -> Neighbours:
    settings = LinkSettings(codec=WireCodec.fp32)
    n = Neighbours(1, 3, FP, settings, shape, shape[0], Counter(), limits=limits)
    await n.listen("127.0.0.1:0")
    return n


async def peer_link(n: Neighbours, peer_id: str, shape=SHAPE) -> tuple[Link, object]:
    settings = LinkSettings(codec=WireCodec.fp32)
    channel, call = dial(f"127.0.0.1:{n.port}", settings)
    link = Link(call, settings, shape, shape[0], peer_id)
    link.start()
    hs = Handshake(Identity.generate(), 0, FP)
    link.post(hs.offer())
    answer = await asyncio.wait_for(link.recv(), 10)
    assert isinstance(answer, Hello) and hs.check_answer(answer) is None
    link.post(hs.prove(answer))
    link.peer_id = hs.identity.node_id  # what the node knows us by
    return link, channel


async def poll(pred, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_fast_peer_is_held_back_not_refused():
    n = await serving(PeerLimits(max_in_flight=5))
    link, channel = await peer_link(n, "fast")
    try:
        for step in range(30):
            link.post(Notice(NoticeKind.step_done, step, (0,), "fast"))
        await poll(lambda: n.inbox.qsize() == 5)
        await asyncio.sleep(0.3)
        assert n.inbox.qsize() == 5  # the rest waits in the stream, not in our memory
        got = []
        while len(got) < 30:  # the worker takes them: every one arrives, in order
            _, msg = await asyncio.wait_for(n.inbox.get(), 10)
            if not isinstance(msg, LinkUp):  # the link's first item: it is up
                got.append(msg.step)
            assert n.inbox.qsize() <= 5
        assert got == list(range(30))
        assert not n.errors and not n.bans
    finally:
        link.close()
        await channel.close()
        await n.close()


async def test_past_the_inbox_byte_budget_a_peer_is_read_no_further_and_nothing_is_lost():
    """#10 H5: with 64 KiB messages and a budget of 0.1 MiB, the reader stops at two waiting
    (under the budget, then one over it) although the in-flight count would allow 64; what it
    did not read waits in the stream, and all of it arrives, in order, once the worker takes."""
    big = (2, 64, 128)  # 64 KiB of fp32
    n = await serving(PeerLimits(max_inbox_mb=0.1), shape=big)
    link, channel = await peer_link(n, "heavy", shape=big)
    try:
        for i in range(12):
            fwd = Forward(MicrobatchId(i, 0), torch.randn(big), torch.tensor([0, 1]), "f" * 16)
            link.post(fwd)
        await poll(lambda: n.inbox.qsize() >= 3)  # LinkUp and two forwards
        await asyncio.sleep(0.5)
        assert n.inbox.qsize() == 3 and n.inbox.bytes < 2 * 0.1 * (1 << 20)
        got = []
        while len(got) < 12:
            _, msg = await asyncio.wait_for(n.inbox.get(), 10)
            if isinstance(msg, Forward):
                got.append(msg.id.step)
            assert n.inbox.bytes <= 0.1 * (1 << 20) + 2 * (64 << 10) + 4096
        assert got == list(range(12)) and not n.errors and not n.bans
    finally:
        link.close()
        await channel.close()
        await n.close()


async def test_an_outlier_activation_bans_its_sender():
    n = await serving(PeerLimits(outlier_after=4, outlier_factor=100.0))
    link, channel = await peer_link(n, "odd")
    try:
        for i in range(4):
            link.post(
                Forward(MicrobatchId(0, i), torch.randn(SHAPE), torch.tensor([0, 1]), "f" * 16)
            )
        link.post(
            Forward(MicrobatchId(0, 4), torch.randn(SHAPE) * 1000, torch.tensor([0, 1]), "f" * 16)
        )
        await poll(lambda: n.bans)
        assert n.bans[0][0] == link.peer_id and "OUT_OF_RANGE" in n.bans[0][1]
        replies = []
        with pytest.raises(Exception):  # noqa: B017 - the stream ends after the notices
            while True:
                replies.append(await asyncio.wait_for(link.recv(), 10))
        codes = [r.code for r in replies if isinstance(r, ErrorReport)]
        assert codes == ["OUT_OF_RANGE", "PERMISSION_DENIED"], replies
        items = [n.inbox.get_nowait() for _ in range(n.inbox.qsize())]
        forwards = [m for _, m in items if isinstance(m, Forward)]
        assert [f.id.index for f in forwards] == [0, 1, 2, 3]  # the outlier never got in
        await poll(lambda: any(isinstance(m, LinkDown) for _, m in items) or not n.inbox.empty())
    finally:
        link.close()
        await channel.close()
        await n.close()


async def test_a_step_the_node_would_refuse_is_refused_undecoded_and_a_flood_of_them_bans(
    monkeypatch,
):
    """#10 M5: a stranger's forwards of a far step cost a full decode each and never led to
    a ban (a flood took the event loop: resbm bench flood). Now a step the protocol core would
    refuse anyway (`step_filter`) is refused from the message's header, and more than
    limits.max_refused refusals in a minute ban the peer."""
    import node.transport.link as link_mod

    decoded = []
    real = link_mod.from_pb
    monkeypatch.setattr(
        link_mod,
        "from_pb",
        lambda m, *a, **k: decoded.append(m.WhichOneof("body")) or real(m, *a, **k),
    )
    n = await serving(PeerLimits(max_refused=16))
    n.step_filter = lambda peer, side, step: "too far ahead" if step > 5 else None
    link, channel = await peer_link(n, "far")
    try:
        fwd = Forward(MicrobatchId(9, 0), torch.randn(SHAPE), torch.tensor([0, 1]), "f" * 16)
        for _ in range(20):
            link.post(fwd)
        await poll(lambda: n.bans)
        assert n.bans[0][0] == link.peer_id and "limits.max_refused" in n.bans[0][1]
        assert "forward" not in decoded and n.errors["FAILED_PRECONDITION"] == 17
        items = [n.inbox.get_nowait() for _ in range(n.inbox.qsize())]
        assert not [m for _, m in items if isinstance(m, Forward)]  # none reached the worker
    finally:
        link.close()
        await channel.close()
        await n.close()


async def test_closed_links_are_pruned_and_their_counts_kept():
    """#10 H5: every closed link stayed in the node's tables (a flood of fresh keys left one
    each, for ever). Now all but the newest KEEP_CLOSED closed links of a side are dropped,
    and what they sent still counts (metrics and the exit summary stay monotonic)."""
    from node.peering import KEEP_CLOSED

    class Quiet:  # a stream nobody reads or writes: these links never start
        pass

    settings = LinkSettings(codec=WireCodec.fp32)
    n = Neighbours(1, 3, FP, settings, SHAPE, 2, Counter())
    for i in range(200):
        link = Link(Quiet(), settings, SHAPE, 2, f"p{i}")
        link.peer_stage, link.peer_id = 0, f"peer-{i}"
        link.bytes_sent["forward"] += 10
        n._attach(link)
        link.close()
    assert len(n.ups) <= KEEP_CLOSED + 1 and "peer-199" in n.ups
    assert sum(lk.bytes_sent["forward"] for lk in n.counted()) == 2000


async def test_big_tensors_are_decoded_off_the_event_loop_and_their_cpu_charged_to_the_sender(
    monkeypatch,
):
    """#10 M5: a tensor message of 64 KiB or more is decoded on a `resbm-decode` thread, not the
    event loop, and the CPU it took is charged to its sender: past its share (a tiny one here),
    that peer is read no faster than its share pays for, while another peer is read at once."""
    import threading

    import node.transport.link as link_mod

    threads = []
    real = link_mod.from_pb

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(link_mod, "from_pb", spy)
    big = (2, 64, 256)  # 128 KiB of fp32: one message (a chunk's worth) each
    n = await serving(PeerLimits(decode_cpu_share=1e-5), shape=big)
    flood, c1 = await peer_link(n, "flood", shape=big)
    honest, c2 = await peer_link(n, "honest", shape=big)
    try:
        for i in range(30):
            fwd = Forward(MicrobatchId(0, i % 2), torch.randn(big), torch.tensor([0, 1]), "f" * 16)
            flood.post(fwd)
        await poll(lambda: n.guard.throttled_s > 0)
        honest.post(Notice(NoticeKind.step_done, 0, (0,), "honest"))
        got: list[str] = []

        async def drain(until: float) -> None:
            while asyncio.get_running_loop().time() < until:
                with contextlib.suppress(TimeoutError):
                    link, msg = await asyncio.wait_for(n.inbox.get(), 0.1)
                    if isinstance(msg, (Forward, Notice)):
                        got.append(link.peer_id)

        await drain(asyncio.get_running_loop().time() + 1.5)
        assert honest.peer_id in got  # read at once: its own share
        assert got.count(flood.peer_id) < 10  # held back: its share pays for a few at most
        assert any(t.startswith("resbm-decode") for t in threads)  # the big ones, off the loop
        assert "MainThread" in threads  # the small ones (Hellos, notices), inline
        assert not n.bans  # held back, not refused
    finally:
        for link, channel in ((flood, c1), (honest, c2)):
            link.close()
            await channel.close()
        await n.close()
