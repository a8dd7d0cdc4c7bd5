"""kill -9 of a node's or the coordinator's main process alone (an OOM kill, a crash): hivemind's
DHT process, its p2pd and the averager process must die with it, not live on as orphans that
answer in the DHT for a replica that no longer trains (found by hand; common/reaper.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from common.reaper import _stat, descendants
from tests.helpers import endless_swarm, wait_for

pytestmark = pytest.mark.swarm


def _alive(procs: dict[int, int]) -> list[int]:
    """The pids of `procs` (pid -> start time) that are still those processes and not zombies."""
    out = []
    for pid, started in procs.items():
        st = _stat(pid)
        state = None
        if st is not None and st[1] == started:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        if state not in (None, b"Z"):
            out.append(pid)
    return out


def test_a_sigkilled_node_and_coordinator_take_their_hivemind_children_along(tmp_path: Path):
    swarm = endless_swarm(tmp_path / "sim")
    try:
        swarm.launch()
        for victim in (swarm.nodes[0], swarm.launcher.coordinator):
            pid = victim.proc.pid
            # the DHT process, p2pd and (on a node) the averager, plus the reaper itself
            kids = wait_for(lambda pid=pid: (d := descendants(pid)) and len(d) >= 3 and d)
            os.kill(pid, signal.SIGKILL)  # the main process only, not its process group
            victim.proc.wait(timeout=10)
            victim.killed = True
            try:
                wait_for(lambda kids=kids: not _alive(kids), timeout=20)
            except AssertionError:
                left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in _alive(kids)}
                raise AssertionError(f"{victim.name} left {left} behind") from None
    finally:
        swarm.kill_all()
