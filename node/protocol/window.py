"""Stage 0's in-flight window, sized at run time (#11): how many of its microbatches may be between
their forward and their gradient's return.

Too small a window leaves the pipeline idle for most of every round trip: with K in flight,
stage 0 can start one microbatch per round trip / K, so on a 50 ms link and four stages a window
of one microbatch a stage keeps a third of the no-latency speed (benchmarks/README.md). Too large
a one holds every stage's activations for nothing. The right size is the bandwidth-delay product,
as TCP BBR (Cardwell et al., 2016) sizes its flight: the round trip a microbatch takes with no
queue ahead of it, over the interval at which the pipeline takes microbatches. Both are measured
here from what stage 0 sees anyway, its forwards leaving and their gradients coming back:

- the round trip is the least of the recent ones (a queue only adds to it; BBR's min-RTT). A
  step's first microbatches find the pipeline empty on 1F1B; on the overlapped schedule queues
  form only behind a stage slower than stage 0;
- the interval is the larger of stage 0's own compute time a microbatch (forward and backward)
  and the median gap between gradients coming back (the slowest stage's pace; the median leaves
  out the gaps of a step's end).

The window is then ceil(round trip / interval), never below the schedule's own (S, or S + D on
the overlapped schedule) unless the memory bound is lower, and never above it:
`activation_memory_mb` over what one microbatch holds on the stage that holds most
(presets.memory_estimate, which a test checks against what autograd saves). Each stage-0 replica
sizes its own: a later stage holds at most the sum of the windows of the stage-0 replicas that
send to it, so with fewer replicas than stage 0 it may hold more than its own budget (not
bounded here; the inbox's byte budget is, docs/security.md). It changes only the order work is
done in, never the arithmetic: a swarm still equals the reference trainer, whatever window it
ran with (tests/swarm/test_overlapped.py, and every harness scenario). `max_in_flight` > 0
fixes it.

Pure: times come in as arguments (the event's clock), so the protocol harness drives it too.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING

from node.data import MicrobatchId
from node.model.presets import memory_estimate

if TYPE_CHECKING:
    from node.protocol.core import Core

SAMPLES = 64  # recent round trips and gaps kept (a few steps' worth: a link may change)


class Window:
    def __init__(self, samples: int = SAMPLES):
        self.sent: dict[MicrobatchId, float] = {}
        self.rtts: deque[float] = deque(maxlen=samples)
        self.gaps: deque[float] = deque(maxlen=samples)
        self.last_back: float | None = None
        self.bytes_per_mb: int | None = None  # one microbatch's (microbatch_bytes)

    def on_sent(self, mid: MicrobatchId, now: float) -> None:
        """A forward of ours left (a re-send restarts its clock: its first trip was lost)."""
        self.sent[mid] = now

    def on_gradient(self, mid: MicrobatchId, now: float) -> None:
        """Its gradient is back: one round trip and one gap measured."""
        t0 = self.sent.pop(mid, None)
        if t0 is not None and now >= t0:
            self.rtts.append(now - t0)
        if self.last_back is not None and now >= self.last_back:
            self.gaps.append(now - self.last_back)
        self.last_back = now

    def forget(self, step: int) -> None:
        """At step `step`'s start: drop the forwards of steps before it still timed (their
        gradients came by a recovery, or never will)."""
        for mid in [m for m in self.sent if m.step < step]:
            del self.sent[mid]
        self.last_back = None  # the gap across a step's end is the round's, not a pace

    @property
    def round_trip_s(self) -> float | None:
        return min(self.rtts) if self.rtts else None

    def interval_s(self, s_per_mb: float) -> float | None:
        """The pace the pipeline takes microbatches at: stage 0's own, or a slower stage's."""
        gap = statistics.median(self.gaps) if len(self.gaps) >= 4 else 0.0
        pace = max(s_per_mb, gap)
        return pace if pace > 0 else None

    def size(self, floor: int, cap: int, s_per_mb: float) -> int:
        """The window: the round trip over the interval, within [floor, cap] (the cap wins:
        it is the memory bound). Until both are measured, the floor."""
        rtt, pace = self.round_trip_s, self.interval_s(s_per_mb)
        want = floor if rtt is None or pace is None else math.ceil(rtt / pace)
        return max(1, min(max(want, floor), cap))


def memory_cap(budget_mb: float, bytes_per_mb: int | None, most: int) -> int:
    """The most microbatches whose activations fit in `budget_mb` (`activation_memory_mb`), at
    most `most` (all the schedule could have in flight); `most` when not known."""
    if not bytes_per_mb:
        return most
    return max(1, min(most, int(budget_mb * (1 << 20)) // bytes_per_mb))


def microbatch_bytes(cfg) -> int:
    """What one in-flight microbatch holds on the stage that holds most (the last stage holds
    one at a time): its activations and, under bf16 autocast, its copy of the matmul weights
    (presets.memory_estimate, checked against what autograd saves in test_presets.py)."""
    per = [
        memory_estimate(cfg.model, k, batch_size=cfg.batch_size, in_flight=1,
                        precision=cfg.precision)
        for k in range(cfg.model.n_stages - 1)
    ]  # fmt: skip
    return int(max(e["activations"] + e["weight_copies"] for e in per))


def dispatch_limit(c: Core) -> int:
    """Stage 0's microbatches that may be in flight: `max_in_flight`, or the window sized from
    the measured round trip and compute time within `activation_memory_mb`."""
    s = c.state
    window = c.cfg.max_in_flight
    if not window:
        most = c.M + c.schedule.overlap
        if s.window.bytes_per_mb is None:
            s.window.bytes_per_mb = microbatch_bytes(c.cfg)
        cap = memory_cap(c.cfg.activation_memory_mb, s.window.bytes_per_mb, most)
        window = s.window.size(c.schedule.window_floor(c.n_stages), cap, s.s_per_mb)
    s.window_size = window
    return c.schedule.dispatch_limit(c.M, window)
