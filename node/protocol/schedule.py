"""Pipeline schedules: when stage 0 may dispatch, when a stage's part of a step is done, and
what ends a step. A new schedule is one new class here and one name in SCHEDULES (chosen by the
`schedule` setting, which every node of a swarm must share: it is in the manifest).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from node.protocol.state import StageState


class Schedule(Protocol):
    name: ClassVar[str]

    def dispatch_limit(self, microbatches: int, n_stages: int, max_in_flight: int) -> int:
        """How many of stage 0's microbatches may be in flight (forwarded, no gradient yet)."""

    def part_done(self, state: StageState) -> bool:
        """Has this replica done everything of the step that the stage owes (stage 0: its
        share is counted; others: upstream's STEP_DONE notices cover every id)?"""

    def barrier(self) -> bool:
        """Does a step end with a synchronous averaging round before the next one starts?"""


class OneFOneB:
    """One forward, one backward (PipeDream-flush's 1F1B): stage 0 keeps at most one
    microbatch per stage in flight (or --max-in-flight), every stage runs a microbatch's
    backward as soon as its gradient arrives, and the step ends with a flush: every replica's
    gradients are summed in one averaging round, the update is applied, then the next step
    starts. The update is the reference trainer's, microbatch for microbatch."""

    name: ClassVar[str] = "1f1b"

    def dispatch_limit(self, microbatches: int, n_stages: int, max_in_flight: int) -> int:
        return min(microbatches, max_in_flight or n_stages)

    def part_done(self, state: StageState) -> bool:
        L = state.ledger
        if state.is_first:
            return not L.queue and set(L.share) <= L.counted
        return L.upstream_done() == set(range(state.microbatches))

    def barrier(self) -> bool:
        return True


SCHEDULES: dict[str, type] = {OneFOneB.name: OneFOneB}


def make_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]()
    except KeyError:
        raise ValueError(
            f"unknown schedule {name!r}: set --schedule to one of {sorted(SCHEDULES)}"
        ) from None
