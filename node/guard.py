"""What one neighbour may cost this node: backpressure for the honest, bans for the broken.

Two kinds of limits, on purpose:
- Rate and in-flight limits *slow a peer down* instead of refusing it: the node stops reading that
  peer's stream until it has room (gRPC flow control then holds the sender back). An honest peer
  that is merely fast loses nothing; a flooding one gets no more than its share of this node.
- Garbage *bans* the peer at once: a tensor that is not finite, beyond the magnitude bound, of the
  wrong shape or codec, an RMS that is an outlier against what this link's side has carried, a
  message too big, a malformed or impossible message. An honest node of the same version and
  swarm config never sends any of these (it refuses to encode non-finite values and checks what
  it computes), so there is no "strike three": the first one is a broken or hostile peer.

A ban closes the link after telling the peer why (PERMISSION_DENIED, "banned ...", with the
microbatch id). A node that hears it checks its own record of what it sent (SentLog): if that
was garbage by its own checks (its hardware or install is broken), it stops, as a crash would,
and its neighbours recompute its microbatches (recovery.py): nothing it sent is applied and
nothing is lost. If what it sent passes its own checks, it does not stop (else any peer could
stop any node with one message); that link stays closed. Bans are by node id and expire.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque

import torch

from node.errors import NodeFailed
from node.ops_config import PeerLimits
from node.wire.codec import MAX_ABS, WireError

log = logging.getLogger(__name__)

# refusal codes that mean "broken or hostile", never "a race between honest peers" (those are
# FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS, ABORTED, UNAVAILABLE: stale steps, replays,
# syncing, an id two stage-0 replicas both sent: protocol/disputes.py)
GARBAGE = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "DATA_LOSS"})
BANNED_PREFIX = "banned"
# the smallest baseline RMS the outlier test divides by: a tensor this small times the factor
# poisons nothing, and a fresh ResBM's boundary gradients start near zero (its decoders are
# zero at init: RMS ~1e-12 at step 0, ~1e-6 a step later), which banned honest neighbours
# with 16 microbatches a step (found by `resbm bench latency`)
RMS_FLOOR = 1e-4
BAN_TABLE = 4096  # bans held at once (ended ones pruned first, then the oldest)
CPU_BURST_WINDOW_S = 4.0  # a peer may spend this many seconds of its decode share at once


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take` waits for one instead of failing."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self.tokens, self.stamp = float(burst), clock()

    def delay(self, cost: float = 1.0) -> float:
        """Take `cost` tokens; how long the caller must wait before using them (0 = now)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class OutlierCheck:
    """RMS of the tensors one side of a node carries (activations in, gradients in): a new one
    more than `factor` times the running median is refused. Starts judging after `min_samples`
    accepted tensors; training moves the scale slowly, a window of recent ones follows it."""

    def __init__(self, factor: float, window: int = 64, min_samples: int = 16):
        self.factor, self.min_samples = factor, min_samples
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, rms: float) -> str | None:
        if len(self.recent) >= self.min_samples:
            median = statistics.median(self.recent)
            base = max(median, RMS_FLOOR)
            if rms > self.factor * base:
                return (
                    f"tensor RMS {rms:.3g} is {rms / base:.0f}x the recent median {median:.3g}"
                    + ("" if median >= RMS_FLOOR else f" (taken as {RMS_FLOOR:g})")
                )
        return None

    def accept(self, rms: float) -> None:
        if math.isfinite(rms):
            self.recent.append(rms)


class SentLog:
    """What this node sent, per (peer, step, index): the max |value| and RMS of each tensor, so
    that a ban notice from a neighbour can be checked against our own record before we act on
    it. A neighbour's word alone never stops a node (else any peer could stop any node)."""

    def __init__(self, outlier_factor: float, cap: int = 4096):
        self.factor, self.cap = outlier_factor, cap
        self.sent: dict[tuple[str, int, int], tuple[float, float, str]] = {}
        self.own = {side: OutlierCheck(outlier_factor) for side in ("forward", "backward")}

    def record(self, peer: str, side: str, step: int, index: int, tensor) -> None:
        t = tensor.detach().float()
        finite = bool(torch.isfinite(t).all())
        stats = (float(t.abs().max()) if finite and t.numel() else math.inf, _rms(t), side)
        self.sent[(peer, step, index)] = stats
        if len(self.sent) > self.cap:
            del self.sent[next(iter(self.sent))]
        if finite:
            self.own[side].accept(stats[1])

    def verdict(self, peer: str, step: int, index: int, max_abs: float) -> str | None:
        """Why what we sent `peer` for (step, index) was garbage by our own checks, or None
        (we sent nothing we know of, or it was fine)."""
        stats = self.sent.get((peer, step, index))
        if stats is None:
            return None
        peak, rms, side = stats
        if not math.isfinite(peak) or peak > max_abs:
            return f"we sent values up to {peak:.3g} (bound {max_abs:g})"
        # like with like: a middle stage's activations are ~1000x its gradients, so judging a
        # forward by the backward median "found" garbage in any honest forward, and one
        # forged ban notice stopped the node (review, #10 H3)
        if self.own[side].check(rms) is not None:
            return f"we sent a {side} tensor of RMS {rms:.3g}, an outlier against our own"
        return None


def _rms(t) -> float:
    return float(t.pow(2).mean().sqrt()) if t.numel() else 0.0


class PeerGuard:
    def __init__(self, limits: PeerLimits, clock=time.monotonic):
        self.limits, self.clock = limits, clock
        self.banned_until: dict[str, float] = {}
        self.reasons: dict[str, str] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._cpu: dict[str, TokenBucket] = {}  # CPU seconds decoding each peer's messages
        self._outliers: dict[tuple[str, str], OutlierCheck] = {}  # (peer, side): its own
        self._refused: dict[str, tuple[float, int]] = {}  # peer -> (minute began, refusals)
        self.sent = SentLog(limits.outlier_factor)
        self.throttled_s = 0.0  # time spent holding peers back (a metric)

    # ---- bans ----------------------------------------------------------------------------
    def ban(self, peer: str, reason: str) -> None:
        """Bans are held per id, and ids cost a keypair: the table is pruned of ended bans and
        capped (the oldest ban goes first), so a stream of new ids cannot grow it (#10 H5)."""
        now = self.clock()
        if len(self.banned_until) >= BAN_TABLE:
            for p in [p for p, t in self.banned_until.items() if t <= now]:
                del self.banned_until[p]
                self.reasons.pop(p, None)
            while len(self.banned_until) >= BAN_TABLE:
                oldest = next(iter(self.banned_until))
                del self.banned_until[oldest]
                self.reasons.pop(oldest, None)
        self.banned_until.pop(peer, None)  # re-inserted: the newest
        self.banned_until[peer] = now + self.limits.ban_s
        self.reasons[peer] = reason[:500]

    def banned(self, peer: str) -> float | None:
        """Seconds of ban left for `peer`, or None."""
        until = self.banned_until.get(peer)
        if until is None:
            return None
        left = until - self.clock()
        if left <= 0:
            del self.banned_until[peer]
            self.reasons.pop(peer, None)
            return None
        return left

    # ---- rate ----------------------------------------------------------------------------
    async def throttle(self, peer: str) -> None:
        """Before reading `peer`'s next message: wait for a message token, and for its CPU
        debt (what decoding its messages cost past its share) to be paid off."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.limits.rate_per_s, self.limits.burst)
        wait = max(bucket.delay(), self._cpu_bucket(peer).delay(0.0))
        if wait > 0:
            self.throttled_s += wait
            await asyncio.sleep(wait)

    def charge(self, peer: str, cpu_s: float) -> None:
        """Decoding one of `peer`'s messages took `cpu_s` seconds of CPU. Each peer gets
        `limits.decode_cpu_share` of a core (saved up for CPU_BURST_WINDOW_S at most); past it,
        it is read only as fast as its share pays for (#10 M5: a peer's flood of big in-window
        tensors took the event loop; an honest neighbour's cost a small fraction of it)."""
        if cpu_s > 0:
            self._cpu_bucket(peer).delay(cpu_s)

    def _cpu_bucket(self, peer: str) -> TokenBucket:
        bucket = self._cpu.get(peer)
        if bucket is None:
            share = self.limits.decode_cpu_share
            bucket = self._cpu[peer] = TokenBucket(share, share * CPU_BURST_WINDOW_S, self.clock)
        return bucket

    @staticmethod
    def is_ban_notice(report) -> bool:
        return report.code == "PERMISSION_DENIED" and report.message.startswith(BANNED_PREFIX)

    def judge_ban(self, peer: str, report, stage: int) -> None:
        """A neighbour banned us. If our own record says what we sent it was garbage (bad
        hardware, a broken install), stop, as a crash would: the swarm recomputes our work
        without us. Otherwise its word alone does not stop us; that link stays closed."""
        verdict = None
        if report.id is not None:
            verdict = self.sent.verdict(peer, report.id.step, report.id.index, MAX_ABS)
        if verdict is not None:
            raise NodeFailed(
                f"neighbour {peer} banned this node, and rightly: {verdict} "
                f"({report.message}); check this machine's hardware and install"
            )
        log.error(
            "stage %d: neighbour %s banned this node (%s), but what we sent it passes our own "
            "checks: not stopping",
            stage,
            peer,
            report.message,
        )

    def refused(self, peer: str) -> bool:
        """Count a refusal that is no garbage (a wrong step, a race between honest peers);
        True once the peer has caused more than `limits.max_refused` in a minute: honest races
        make a few a step, a peer sending only such messages makes us decode them all."""
        now = self.clock()
        start, n = self._refused.get(peer, (now, 0))
        if now - start > 60.0:
            start, n = now, 0
        self._refused[peer] = (start, n + 1)
        return n + 1 > self.limits.max_refused

    def refusals(self, peer: str) -> int:
        """Refusals of `peer` in its current minute."""
        return self._refused.get(peer, (0.0, 0))[1]

    def forget(self, peer: str) -> None:
        """Its link closed: drop its rate bucket and statistics (a ban stays until it ends)."""
        self._buckets.pop(peer, None)
        self._cpu.pop(peer, None)
        self._refused.pop(peer, None)
        for key in [k for k in self._outliers if k[0] == peer]:
            del self._outliers[key]

    # ---- tensors -------------------------------------------------------------------------
    def check_tensor(self, peer: str, side: str, tensor) -> WireError | None:
        """`side`: "forward" (activations from upstream) or "backward" (gradients from
        downstream). Shape, codec and finiteness were checked at decode; this is the outlier
        test against what this peer sent on this side before (per peer: nobody can shift the
        baseline another peer is judged by), and on success the tensor joins its statistics.
        A peer still in its warm-up (fewer than `outlier_after` tensors of its own) is judged
        against the peers on this side that are past theirs, by the largest of their medians:
        ids are free, and each fresh one skipped the check for its first tensors (#10 H4). The
        largest, so that peers sending tiny tensors cannot lower the bar an honest newcomer
        must pass (with the median, two such keys got every honest joiner banned: a review)."""
        key = (peer, side)
        check = self._outliers.get(key)
        if check is None:
            lim = self.limits
            check = OutlierCheck(lim.outlier_factor, lim.outlier_window, lim.outlier_after)
            self._outliers[key] = check
        rms = _rms(tensor.float())
        problem = check.check(rms)
        if problem is None and len(check.recent) < check.min_samples:
            pooled = self._pooled(side).check(rms)
            problem = pooled and f"{pooled}, the largest past its warm-up (this peer is in its own)"
        if problem is not None:
            return WireError("OUT_OF_RANGE", problem)
        check.accept(rms)
        return None

    def _pooled(self, side: str) -> OutlierCheck:
        """The side's baseline for a peer in its warm-up: the largest median of the peers past
        their own warm-up (an OutlierCheck of that one value)."""
        medians = [
            statistics.median(check.recent)
            for (_, s), check in self._outliers.items()
            if s == side and len(check.recent) >= check.min_samples
        ]
        pool = OutlierCheck(self.limits.outlier_factor, window=1, min_samples=1)
        if medians:
            pool.accept(max(medians))
        return pool
