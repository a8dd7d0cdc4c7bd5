"""Pipeline schedules: when stage 0 may dispatch, when a stage's part of a step is done, and
what ends a step. A new schedule is one new class here and one name in SCHEDULES (chosen by the
`schedule` setting, which every node of a swarm must share: it is in the manifest).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from node.protocol.state import StageState


class Schedule(Protocol):
    name: ClassVar[str]

    def window_floor(self, n_stages: int) -> int:
        """The least window stage 0 keeps (the measured one only widens it: window.py)."""

    def dispatch_limit(self, microbatches: int, window: int) -> int:
        """How many of stage 0's microbatches may be in flight (forwarded, no gradient yet),
        given the window (`max_in_flight`, or sized at run time: window.py)."""

    def part_done(self, state: StageState) -> bool:
        """Has this replica done everything of the step that the stage owes (stage 0: its
        share is counted; others: upstream's STEP_DONE notices cover every id)?"""

    def barrier(self) -> bool:
        """Does a step end with a synchronous averaging round before the next one starts?"""

    @property
    def overlap(self) -> int:
        """How many of step t+1's first microbatches a stage takes while still in step t (they
        run at the weights before step t's update: StageRuntime.is_early)."""


class OneFOneB:
    """One forward, one backward (PipeDream-flush's 1F1B): stage 0 keeps one microbatch per
    stage in flight, or more where the round trip needs it (window.py; fewer only where
    --activation-memory-mb says so), every stage runs a microbatch's backward as soon as its
    gradient arrives, and the step ends with a flush: every replica's gradients are summed in
    one averaging round, the update is applied, then the next step starts. The update is the
    reference trainer's, microbatch for microbatch."""

    name: ClassVar[str] = "1f1b"
    overlap: int = 0

    def window_floor(self, n_stages: int) -> int:
        return n_stages

    def dispatch_limit(self, microbatches: int, window: int) -> int:
        return min(microbatches, window)

    def part_done(self, state: StageState) -> bool:
        L = state.ledger
        if state.is_first:
            return not L.queue and set(L.share) <= L.counted
        return L.upstream_done() == set(range(state.microbatches))

    def barrier(self) -> bool:
        return True


class Overlapped(OneFOneB):
    """1F1B that never drains at a step boundary: once stage 0 has dispatched its share of step
    t, it goes on with step t+1's first `overlap` microbatches while step t's last gradients
    come back, and stage k takes the first ceil(D (S-1-k)/(S-1)) of them as they come, at its
    weights before step t's update (the rule, and why: node/trainer.py). The step still ends
    with its round and update (the round beside those microbatches); the next step's other
    microbatches wait for it. The window is at least 1F1B's plus the overlap (memory
    allowing): those microbatches are what fills the round trip a drain would leave idle
    (size_overlap).

    A stage's part is done as on 1F1B: when its upstream replicas hold every gradient it sent
    (their STEP_DONEs), one round trip to the stage before. Applying once upstream has only
    forwarded every id was built and measured (85.8% of the no-latency speed at 50 ms against
    76.2%: benchmarks/README.md) and left out: a replica that then dies with a gradient in
    flight can be redone only by a sibling still in the run, and not when the downstream
    replica that held its z died too (a review's scenarios stalled)."""

    name: ClassVar[str] = "overlapped"

    def __init__(self, overlap: int):
        self.overlap = overlap

    def window_floor(self, n_stages: int) -> int:
        return n_stages + self.overlap

    def dispatch_limit(self, microbatches: int, window: int) -> int:
        return min(microbatches + self.overlap, window)


def size_overlap(round_trip_s: float, s_per_mb: float, microbatches: int) -> int:
    """The overlap that hides a drain: the microbatches stage 0 can start in the time the last
    one's gradient takes to come back beyond its compute (`round_trip_s`: the fill and the
    drain, 2 (S-1) one-way latencies plus the hops' transfer), at the bottleneck stage's
    `s_per_mb`, rounded up; at most a step's microbatches. That is the memory bound too: a
    stage then holds at most S + M microbatches' activations (the window S + D)."""
    if s_per_mb <= 0:
        raise ValueError("s_per_mb must be positive (a measured compute time per microbatch)")
    return min(max(0, -int(-round_trip_s // s_per_mb)), microbatches)


SCHEDULES: dict[str, type] = {OneFOneB.name: OneFOneB, Overlapped.name: Overlapped}


def make_schedule(name: str, overlap: int = 0) -> Schedule:
    try:
        kind = SCHEDULES[name]
    except KeyError:
        raise ValueError(
            f"unknown schedule {name!r}: set --schedule to one of {sorted(SCHEDULES)}"
        ) from None
    return kind(overlap) if kind is Overlapped else kind()
