"""Where a joining node goes, and when a node should move: pure functions of the swarm map.

A pipeline runs as fast as its slowest stage, and a stage's speed is the summed throughput of its
online replicas. So a new node joins the stage with the least of it, and a node moves only when
the swarm is badly unbalanced *and* the move makes the bottleneck faster: the hysteresis that
keeps nodes from bouncing between stages (each move costs a process restart and a weight
download). The coordinator (coordinator/service.py) calls these on the map it reads from the DHT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from node.swarm.records import NodeRecord, NodeState

SwarmMap = Mapping[int, Mapping[str, NodeRecord]]  # stage -> peer id -> record


def stage_capacity(records: Mapping[str, NodeRecord], include_joining: bool = False) -> float:
    """Throughput a stage can sustain: what its online replicas sum to (with `include_joining`,
    also what its joining replicas announce they will add)."""
    counted = (NodeState.online, NodeState.joining) if include_joining else (NodeState.online,)
    return sum(r.throughput for r in records.values() if r.state in counted)


def capacities(swarm: SwarmMap, n_stages: int, include_joining: bool = False) -> list[float]:
    return [stage_capacity(swarm.get(k, {}), include_joining) for k in range(n_stages)]


REDUNDANCY = 2  # replicas every stage gets before any stage gets more


def assign(swarm: SwarmMap, n_stages: int) -> int:
    """The stage a joining node should serve: an empty stage first (the swarm cannot train without
    it), then a stage with a single replica (one crash there stops the swarm until a checkpoint
    is restored: every stage gets REDUNDANCY replicas before any stage gets more), and only then
    the one with the least capacity. Ties (e.g. while every node is still joining) go to the
    stage with the least capacity about to arrive, then the fewest replicas, then the lower
    index: so nodes joining in quick succession, each seeing its predecessors' placeholder
    records, spread across the stages instead of piling onto one."""
    counts = [
        sum(r.state is not NodeState.draining for r in swarm.get(k, {}).values())
        for k in range(n_stages)
    ]
    caps = capacities(swarm, n_stages)
    coming = capacities(swarm, n_stages, include_joining=True)
    short = min(min(counts), REDUNDANCY)  # below REDUNDANCY, the fewest replicas come first
    return min(
        range(n_stages),
        key=lambda k: (min(counts[k], REDUNDANCY) > short, caps[k], coming[k], counts[k], k),
    )


@dataclass(frozen=True)
class Move:
    peer_id: str
    from_stage: int
    to_stage: int
    bottleneck_before: float
    bottleneck_after: float


def rebalance(
    swarm: SwarmMap,
    n_stages: int,
    imbalance: float = 2.0,
    min_gain: float = 1.2,
    skip: frozenset[str] = frozenset(),
) -> Move | None:
    """One move that relieves the bottleneck, or None.

    Moves only when the strongest stage has `imbalance` times the weakest one's capacity, and
    only a node whose move raises the swarm's bottleneck by `min_gain` times; never the last
    online node of a stage. Joining replicas count at the throughput they announce: a node that
    is restarting at its new stage must not look like a hole that calls for another move. Only
    online nodes are moved, and none in `skip` (nodes that ignored an earlier move: the choice
    is deterministic, and the same one would be asked again and again).
    """
    caps = capacities(swarm, n_stages, include_joining=True)
    weak = min(range(n_stages), key=lambda k: (caps[k], k))
    strong = max(range(n_stages), key=lambda k: (caps[k], -k))
    if caps[weak] > 0 and caps[strong] < imbalance * caps[weak]:
        return None
    online = [r for r in swarm.get(strong, {}).values() if r.state is NodeState.online]
    if len(online) < 2:
        return None
    donors = [r for r in online if r.peer_id not in skip]
    before = min(caps)
    best: Move | None = None
    for r in sorted(donors, key=lambda r: (r.throughput, r.peer_id)):
        after_caps = list(caps)
        after_caps[strong] -= r.throughput
        after_caps[weak] += r.throughput
        after = min(after_caps)
        if (
            after >= min_gain * before
            and after > before
            and (best is None or after > best.bottleneck_after)
        ):
            best = Move(r.peer_id, strong, weak, before, after)
    return best
