"""Per-peer limits on a real link (node/peering.py + node/guard.py): a peer that sends faster than
the node works is held back by not reading its stream (nothing is refused, nothing lost), and a
peer whose activations are outliers against what the link has carried is banned."""

from __future__ import annotations

import asyncio
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


async def serving(limits: PeerLimits) -> Neighbours:
    settings = LinkSettings(codec=WireCodec.fp32)
    n = Neighbours(1, 3, FP, settings, SHAPE, 2, Counter(), limits=limits)
    await n.listen("127.0.0.1:0")
    return n


async def peer_link(n: Neighbours, peer_id: str) -> tuple[Link, object]:
    settings = LinkSettings(codec=WireCodec.fp32)
    channel, call = dial(f"127.0.0.1:{n.port}", settings)
    link = Link(call, settings, SHAPE, 2, peer_id)
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
