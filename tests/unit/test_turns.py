"""A stage machine's turn runs at most one microbatch's compute (Core.turn_over), so that what
it sends leaves before the next is computed: a turn that ran a whole batch of arrivals sent
nothing until the last was done, and held every stage after it back by a burst's compute (#11).
The rest waits in the machine's backlog, for the next turn, which the driver runs at once
(StageMachine.more, wake_after 0), with what arrived meanwhile appended. Checked in the protocol
harness, which delivers batches of messages as the daemon does (batch_s) and runs the next turn
as the daemon does; the runs still end with the reference trainer's weights."""

from __future__ import annotations

import pytest

from node.protocol import events as ev
from node.protocol import harness, scenarios
from node.wire.messages import Backward, Forward

pytestmark = pytest.mark.unit


class Watched(harness.Swarm):
    """The harness, counting per turn the data messages handed in and the data sent out."""

    def __init__(self, *args, **kwargs):
        self.turns: list[tuple[str, int, int, bool]] = []  # (node, data in, data out, more)
        self._in = 0
        super().__init__(*args, **kwargs)

    def _deliver(self, name: str, events: list) -> None:
        queued = self.inbox.get(name, []) + events
        self._in = sum(isinstance(getattr(e, "msg", None), (Forward, Backward)) for e in queued)
        super()._deliver(name, events)

    def _effects(self, m, effects: list) -> None:
        out = [e for e in effects if isinstance(e, ev.Send)]
        data = sum(isinstance(e.msg, (Forward, Backward)) for e in out)
        self.turns.append((m.name, self._in, data, m.machine.more))
        self._in = 0
        if m.machine.more:
            assert m.machine.wake_after() == 0.0, "a machine with work left must not wait"
        super()._effects(m, effects)


@pytest.mark.parametrize("overlap", [0, 2], ids=["1f1b", "overlapped"])
def test_a_turn_computes_one_microbatch_and_sends_it_before_the_next(overlap):
    swarm = Watched(3, 3, 1, steps=3, mbs=6, partial_rounds=0.0, overlap=overlap, batch_s=0.08)
    out = scenarios.run(swarm, [])
    assert out.ok, out.problems  # the reference trainer's weights, every step
    assert all(data <= 1 for _, _, data, _ in swarm.turns), "a turn sent two microbatches"
    # batches of several data messages came in, and their work went on over later turns
    assert max(n for _, n, _, _ in swarm.turns) >= 2
    assert any(more for *_, more in swarm.turns)
    # stage 0 dispatched its window one forward a turn, not all at once
    first = [data for name, _, data, _ in swarm.turns if name == "s0r0"]
    assert sum(first) == 3 * 6 and max(first) == 1
