"""A read-only view of the swarm around one stage, built from DHT records (node/swarm/records.py).

The machine asks it who may take work, who counts in an averaging round, and whether the stage's
replicas are ahead of this one. Without a DHT (a fixed pipeline from --next) every linked peer is
routable and online, and nobody else exists: `SwarmView.fixed()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.swarm.records import NodeRecord, NodeState


@dataclass(frozen=True)
class SwarmView:
    k: int
    n_stages: int
    dynamic: bool
    records: dict[int, dict[str, NodeRecord]] = field(default_factory=dict)

    @classmethod
    def fixed(cls, k: int, n_stages: int) -> SwarmView:
        return cls(k, n_stages, False)

    def updated(self, records: dict[int, dict[str, NodeRecord]]) -> SwarmView:
        return SwarmView(self.k, self.n_stages, self.dynamic, dict(records))

    def stage(self, s: int) -> dict[str, NodeRecord]:
        return self.records.get(s, {})

    def online(self, stage: int, peer: str) -> bool:
        """Is `peer` an in-sync replica of `stage` (any linked peer, without a DHT)?"""
        if not self.dynamic:
            return True
        rec = self.stage(stage).get(peer)
        return rec is not None and rec.state is not NodeState.joining

    def listed(self, stage: int, peer: str) -> bool:
        """Does `peer` still have a record in `stage` (a live node refreshes its own)?"""
        return not self.dynamic or peer in self.stage(stage)

    def routable(self, peer: str) -> bool:
        if not self.dynamic:
            return True
        rec = self.stage(self.k + 1).get(peer)
        return rec is not None and rec.state is NodeState.online

    def throughputs(self) -> dict[str, float]:
        return {p: r.throughput for p, r in self.stage(self.k + 1).items() if r.throughput > 0}

    def any_online(self, stage: int, dead: set[str]) -> bool:
        """Does the DHT show a replica of `stage` online, other than ones presumed dead?"""
        recs = self.stage(stage)
        return any(r.state is NodeState.online and p not in dead for p, r in recs.items())

    def other_replicas(self, me: str, step: int, dead: set[str]) -> int:
        """Replicas of our stage (other than us) that should join our averaging rounds."""
        if not self.dynamic:
            return 0
        return sum(
            1
            for p, r in self.stage(self.k).items()
            if p != me
            and p not in dead
            and not (r.state is NodeState.joining and r.step < step - 1)  # not loaded yet
        )

    def online_replicas(self, me: str, dead: set[str]) -> set[str]:
        """The in-sync replicas of our stage other than us (as their records say)."""
        if not self.dynamic:
            return set()
        return {
            p for p, r in self.stage(self.k).items()
            if p != me and p not in dead and r.state is NodeState.online
        }  # fmt: skip

    def steps_ahead(self, me: str, step: int, dead: set[str]) -> list[int]:
        """How far each replica of our stage that holds the stage's weights (online, or
        draining: a replica that finished the run is, and lingers) is ahead of `step`
        (negative: behind). A joining one's step is not yet its own."""
        return [
            r.step - step
            for p, r in self.stage(self.k).items()
            if p != me and r.state is not NodeState.joining and p not in dead
        ]

    def agreed_step(self, stage: int, me: str, dead: set[str]) -> int | None:
        """The newest step whose state two replicas of `stage` (other than us) vouch for with
        one digest, or the one replica's newest where only one vouches: how far the stage's
        sealed records *agree* it has got. One stranger's own record claiming a far step made
        its stage look ahead: a node resynced again and again, or took far-step data (#10 H1).
        None: no replica vouches."""
        backers: dict[tuple[int, str], set[str]] = {}
        for p, r in self.stage(stage).items():
            if p != me and p not in dead:
                for v in r.vouches:
                    backers.setdefault((v.step, v.digest), set()).add(p)
        need = min(2, len({p for nodes in backers.values() for p in nodes}))
        return max((t for (t, _), nodes in backers.items() if len(nodes) >= need), default=None)

    def unfinished_replicas(self, me: str, steps: int, dead: set[str]) -> list[str]:
        """Replicas of our stage that have not reached `steps` and are not leaving: what a
        finished replica waits for (one whose last round failed resyncs from it)."""
        return sorted(
            p
            for p, r in self.stage(self.k).items()
            if p != me and p not in dead and r.step < steps and r.state is not NodeState.draining
        )

    def swarm_loss(self) -> float | None:
        """The swarm's latest training loss, as the last stage's replicas announce it (what a
        node of another stage shows in its progress line)."""
        recs = [r for r in self.stage(self.n_stages - 1).values() if r.loss is not None]
        if not recs:
            return None
        top = max(r.step for r in recs)
        losses = [r.loss for r in recs if r.step == top]
        return sum(losses) / len(losses)
