"""A failure that repeats every half second (a redial of a neighbour that is down) is logged
once, then at doubling intervals with a count of what was left out: found by hand, where every
redial logged a multi-line gRPC error."""

from __future__ import annotations

import logging

import pytest

from common.logs import Repeats

pytestmark = pytest.mark.unit


def test_a_repeating_failure_is_a_line_at_growing_intervals(caplog):
    now = [0.0]
    repeats = Repeats(logging.getLogger("t"), first_s=1.0, max_s=8.0, clock=lambda: now[0])
    error = "stage 0: cannot reach stage 1 at h:1: <AioRpcError\n\tstatus = UNAVAILABLE\n>"
    logged = []
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(80):  # 40 s of redials, every 0.5 s
            logged.append(repeats.failed("h:1", error))
            now[0] += 0.5
        assert repeats.failed("other:2", "stage 0: another peer")  # counted apart
        repeats.recovered("h:1", "stage 0: h:1 answers")
    times = [0.5 * i for i, x in enumerate(logged) if x]
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0]  # 1, 2, 4, 8, then 8 s apart
    lines = [r.getMessage() for r in caplog.records]
    assert all("\n" not in line for line in lines)  # the first line of a multi-line error
    assert lines[0] == "stage 0: cannot reach stage 1 at h:1: <AioRpcError"
    assert lines[1].endswith("(1 more since, next report in 2s)")
    assert lines[4].endswith("(15 more since, next report in 8s)")
    assert lines[-1] == "stage 0: h:1 answers"
    assert repeats.failed("h:1", error)  # after a recovery, the next failure is news again
