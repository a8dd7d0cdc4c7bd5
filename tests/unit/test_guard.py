"""Per-peer limits (node/guard.py): the token bucket, the outlier test, bans that expire, and the
inbox that counts each peer's waiting messages."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.data import MicrobatchId
from node.errors import NodeFailed
from node.guard import BANNED_PREFIX, OutlierCheck, PeerGuard, TokenBucket
from node.ops_config import PeerLimits
from node.transport.inbox import PeerInbox
from node.wire.messages import ErrorReport

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_allows_a_burst_then_spaces_messages_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    assert [bucket.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.delay() == pytest.approx(0.1)  # the 4th waits one token's time
    assert bucket.delay() == pytest.approx(0.2)  # and the 5th, two
    clock.t += 10  # refilled, but never beyond the burst
    assert [bucket.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.delay() > 0


def test_outlier_check_judges_only_after_enough_samples_and_follows_the_scale():
    check = OutlierCheck(factor=100.0, window=8, min_samples=4)
    assert check.check(1e6) is None  # too few samples to judge anything
    for _ in range(4):
        assert check.check(1.0) is None
        check.accept(1.0)
    assert check.check(99.0) is None
    problem = check.check(1000.0)
    assert problem is not None and "1000x" in problem
    for _ in range(8):  # training moves the scale: the window follows it
        check.accept(50.0)
    assert check.check(1000.0) is None


def test_near_zero_gradients_at_init_do_not_make_the_first_real_ones_outliers():
    """A fresh ResBM's boundary gradients are ~1e-12 at step 0 (its decoders start at zero)
    and ~1e-6 a step later: a 1e6x jump, on which an honest neighbour was banned. Below
    RMS_FLOOR a baseline counts as the floor; at a real scale the test is as before."""
    check = OutlierCheck(factor=1000.0, window=64, min_samples=16)
    for _ in range(16):
        check.accept(8.7e-13)
    assert check.check(6e-7) is None and check.check(0.05) is None
    assert "taken as" in check.check(0.2)
    for _ in range(64):
        check.accept(1e-3)
    assert check.check(0.5) is None and "2000x" in check.check(2.0)


def test_guard_bans_expire_and_outliers_are_out_of_range():
    clock = Clock()
    guard = PeerGuard(PeerLimits(ban_s=60, outlier_after=2, outlier_factor=10), clock=clock)
    guard.ban("bad", "INVALID_ARGUMENT: NaN")
    assert guard.banned("bad") == pytest.approx(60) and guard.banned("good") is None
    clock.t += 59
    assert guard.banned("bad") == pytest.approx(1)
    clock.t += 2
    assert guard.banned("bad") is None and "bad" not in guard.reasons
    for _ in range(2):
        assert guard.check_tensor("p", "forward", torch.ones(4, 4)) is None
    err = guard.check_tensor("p", "forward", torch.full((4, 4), 50.0))
    assert err is not None and err.code == "OUT_OF_RANGE"
    # statistics are per peer and side: nobody shifts the baseline another is judged by
    assert guard.check_tensor("p", "backward", torch.full((4, 4), 50.0)) is None
    assert guard.check_tensor("q", "backward", torch.full((4, 4), 2.0)) is None
    guard.forget("p")  # its link closed: it starts over, and nobody is past the warm-up
    assert guard.check_tensor("p", "forward", torch.full((4, 4), 50.0)) is None


def test_a_peer_in_its_warm_up_is_judged_against_the_peers_past_theirs():
    """#10 H4: ids are free, and each fresh one skipped the outlier check for its first
    `outlier_after` tensors. Now a peer in its warm-up is judged against the largest median of
    the peers on its side past theirs."""
    guard = PeerGuard(PeerLimits(outlier_after=4, outlier_factor=10))
    for peer, scale in (("a", 1.0), ("b", 1.2)):
        for _ in range(4):
            assert guard.check_tensor(peer, "forward", torch.full((4, 4), scale)) is None
    err = guard.check_tensor("fresh", "forward", torch.full((4, 4), 50.0))  # its first tensor
    assert err is not None and err.code == "OUT_OF_RANGE" and "warm-up" in str(err)
    assert guard.check_tensor("fresh", "forward", torch.full((4, 4), 11.0)) is None  # < 10x 1.2
    assert guard.check_tensor("fresh", "backward", torch.full((4, 4), 50.0)) is None  # by side
    guard.forget("a")
    guard.forget("b")  # nobody is past the warm-up: a newcomer is judged by its own, later
    assert guard.check_tensor("new", "forward", torch.full((4, 4), 50.0)) is None


def test_peers_sending_tiny_tensors_cannot_get_an_honest_newcomer_banned():
    """A review: with the median of the established peers' medians, two keys sending tensors
    of RMS 1e-6 made an honest joiner's first tensor (RMS 1) an outlier, and so a ban."""
    guard = PeerGuard(PeerLimits(outlier_after=16, outlier_factor=1000))
    for peer, scale in (("honest", 1.0), ("tiny-1", 1e-6), ("tiny-2", 1e-6)):
        for _ in range(16):
            assert guard.check_tensor(peer, "forward", torch.full((4, 4), scale)) is None
    assert guard.check_tensor("joiner", "forward", torch.full((4, 4), 1.0)) is None
    assert guard.check_tensor("huge", "forward", torch.full((4, 4), 2000.0)) is not None


def test_a_ban_notice_is_checked_against_what_we_sent():
    guard = PeerGuard(PeerLimits(outlier_factor=100))
    sent = guard.sent
    for i in range(20):
        sent.record("down", "forward", 3, i % 4, torch.randn(2, 8, 4))
    assert sent.verdict("down", 3, 1, max_abs=1e4) is None  # it was fine: do not stop
    assert sent.verdict("down", 9, 9, max_abs=1e4) is None  # nothing we know of
    sent.record("down", "forward", 4, 0, torch.randn(2, 8, 4) * 1e6)
    assert "bound" in sent.verdict("down", 4, 0, max_abs=1e4)
    sent.record("down", "forward", 4, 1, torch.randn(2, 8, 4) * 1e3)  # in bound, but absurd
    assert "outlier" in sent.verdict("down", 4, 1, max_abs=1e4)
    bad = torch.randn(2, 8, 4)
    bad[0, 0, 0] = float("nan")
    sent.record("down", "backward", 4, 2, bad)
    assert "bound" in sent.verdict("down", 4, 2, max_abs=1e4)


def test_a_forged_ban_cannot_stop_an_honest_middle_stage():
    """A middle stage sends activations downstream and ~1000x smaller gradients upstream. A ban
    notice naming an honest forward is judged against our forwards, not our gradients."""
    guard = PeerGuard(PeerLimits(outlier_factor=100))
    sent = guard.sent
    for i in range(20):
        sent.record("down", "forward", 3, i, torch.randn(2, 8, 4) * 10.0)
        sent.record("up", "backward", 3, i, torch.randn(2, 8, 4) * 1e-3)
    notice = ErrorReport(MicrobatchId(3, 5), "PERMISSION_DENIED", f"{BANNED_PREFIX}: forged")
    guard.judge_ban("down", notice, stage=1)  # does not raise: the node goes on
    assert sent.verdict("up", 3, 5, max_abs=1e4) is None
    sent.record("down", "forward", 4, 0, torch.full((2, 8, 4), 3000.0))  # 300x our forwards
    with pytest.raises(NodeFailed, match="forward tensor"):
        guard.judge_ban("down", ErrorReport(MicrobatchId(4, 0), notice.code, notice.message), 1)


async def test_guard_throttle_waits_instead_of_refusing():
    guard = PeerGuard(PeerLimits(rate_per_s=50.0, burst=2))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(5):  # 2 at once, then 3 more at 50/s
        await guard.throttle("p")
    assert loop.time() - t0 >= 0.05
    assert guard.throttled_s > 0


async def test_peer_inbox_counts_each_links_waiting_messages():
    inbox = PeerInbox()
    a, b = object(), object()
    for item in [(a, 1), (a, 2), (b, 3)]:
        await inbox.put(item)
    assert inbox.queued[a] == 2 and inbox.queued[b] == 1
    assert await inbox.get() == (a, 1) and inbox.queued[a] == 1
    inbox.get_nowait()
    inbox.get_nowait()
    assert not inbox.queued and inbox.empty()


def test_the_ban_table_stays_bounded_under_a_stream_of_new_ids(monkeypatch):
    """#10 H5: ids cost a keypair, so a stranger banned under id after id must not grow the
    table: ended bans are pruned, then the oldest go; a live recent ban is kept."""
    import node.guard as guard_mod

    monkeypatch.setattr(guard_mod, "BAN_TABLE", 8)
    now = [0.0]
    guard = PeerGuard(PeerLimits(ban_s=10), clock=lambda: now[0])
    for i in range(100):
        now[0] = i * 0.5
        guard.ban(f"n-{i}", "x" * 10_000)
    assert len(guard.banned_until) <= 8 and len(guard.reasons) <= 8
    assert guard.banned("n-99") is not None and guard.banned("n-0") is None
    assert all(len(r) <= 500 for r in guard.reasons.values())


async def test_a_peers_decode_cpu_past_its_share_holds_its_reads_back():
    """#10 M5: each peer's decoding is charged to it; past its share (saved up for a few
    seconds) the next read of that peer waits until the share has paid the debt. Another peer
    is not held back by it."""
    clock = Clock()
    guard = PeerGuard(PeerLimits(decode_cpu_share=0.5), clock=clock)  # a 2 s burst
    await guard.throttle("x")
    guard.charge("x", 1.5)
    await guard.throttle("x")
    assert guard.throttled_s == 0.0  # within its burst
    guard.charge("x", 0.5 + 0.02)  # 0.02 s of CPU past the burst: 0.04 s at half a core
    t0 = asyncio.get_running_loop().time()
    await guard.throttle("x")
    assert guard.throttled_s == pytest.approx(0.04)
    assert asyncio.get_running_loop().time() - t0 >= 0.03
    await guard.throttle("y")  # another peer: its own share
    assert guard.throttled_s == pytest.approx(0.04)
    clock.t += 10  # paid off, and no more saved up than the burst
    guard.charge("x", 2.0)
    await guard.throttle("x")
    assert guard.throttled_s == pytest.approx(0.04)
    guard.forget("x")  # its link closed: its account goes with it


async def test_the_inbox_holds_a_peer_back_past_the_byte_budget_but_never_starves_one():
    """#10 H5: the inbox counts what its messages hold (decoded tensors, at least 1 KiB each);
    past the budget, a link with something waiting is read no further, while one with nothing
    waiting may still put one in (a flood from many links cannot lock an honest one out)."""
    from node.wire.messages import Backward, held_bytes

    big = Backward(MicrobatchId(0, 0), torch.zeros(256, 256))  # 256 KiB
    assert held_bytes(big) == 256 * 1024 + 1024
    inbox = PeerInbox()
    flood, honest = object(), object()
    budget = 600 * 1024
    assert not inbox.full_for(flood, 64, budget)
    await inbox.put((flood, big))
    await inbox.put((flood, big))
    assert not inbox.full_for(flood, 64, budget)  # 514 KiB: under the budget
    await inbox.put((flood, big))
    assert inbox.bytes == 3 * held_bytes(big)
    assert inbox.full_for(flood, 64, budget)  # over: the flooding link waits
    assert not inbox.full_for(honest, 64, budget)  # nothing of the honest one waits: read it
    await inbox.put((honest, big))
    assert inbox.full_for(honest, 64, budget)
    assert inbox.full_for(flood, 3, 10**9)  # the in-flight count alone, as before
    for _ in range(4):
        inbox.get_nowait()
    assert inbox.bytes == 0 and not inbox.full_for(flood, 64, budget)
