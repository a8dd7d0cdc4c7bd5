"""A stage that loses its last replica mid-run (found by hand: the lone stage-1 replica was
killed at step 27): the coordinator must say which stage stalled and whether a checkpoint can
restore it, and a node asked to stop must not wait on a step that cannot finish."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from node.events import read_events
from tests.helpers import endless_swarm, wait_for

pytestmark = pytest.mark.swarm


def test_a_stalled_stage_is_named_and_a_drain_does_not_wait_for_it(tmp_path: Path):
    swarm = endless_swarm(tmp_path / "sim")
    try:
        swarm.launch()
        first, last = sorted(swarm.nodes, key=lambda p: p.stage)
        wait_for(lambda: len(first.steps()) >= 2)
        os.kill(last.proc.pid, signal.SIGKILL)  # the only replica of stage 1, no checkpoint
        last.proc.wait(timeout=10)
        last.killed = True
        coordinator = swarm.launcher.coordinator

        def stall() -> list[str]:
            return [e["message"] for e in read_events(coordinator.events) if e["event"] == "stall"]

        (line,) = wait_for(stall, timeout=60)  # once its record is gone or presumed dead
        assert line.startswith("stage 1 has no replica online: training is stalled at step")
        assert "no checkpoint of stage 1 is announced" in line
        # stage 0 is mid-step: it must leave, not wait for stage 1 (its grace is 60 s)
        os.kill(first.proc.pid, signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0
        assert "leaving without finishing step" in first.log.read_text()
    finally:
        swarm.kill_all()
