"""Leaving: a draining replica's checks, a finished (or drained) replica's lingering, and the
end of a fixed pipeline's run. One handler over the machine's shared Core (core.py).
"""

from __future__ import annotations

from node.protocol.core import Core, log
from node.protocol.events import Announce, Send
from node.protocol.flow import DataFlow
from node.protocol.recovery import Recovery
from node.swarm.records import NodeState
from node.wire.messages import Notice
from node.wire.messages import NoticeKind as NK

# a drained replica stays this long for a sibling whose last round failed (it notices after
# position.BEHIND_IDLE_S, 5 s, then downloads our state); well short of the daemon's 60 s
# stop grace
DRAIN_LINGER_S = 20.0


class Leaving:
    def __init__(self, core: Core, flow: DataFlow, recovery: Recovery):
        self.c, self.flow, self.recovery = core, flow, recovery

    def check_drain(self) -> str | None:
        """While draining: why we leave now ("stranded", "drained"), or None. A replica with
        nothing of this step becomes `drained`: it lingers first (see lingering)."""
        c, s = self.c, self.c.state
        self.say_leaving()
        if self.idle():
            s.drained = True
            return None
        if (stage := self.stranded()) is not None:
            log.warning(
                "stage %d: leaving without finishing step %d: no replica of stage %d is left "
                "to finish it with (this stage's replicas redo our share)",
                c.k,
                s.step,
                stage,
            )
            return "stranded"
        others = c.view.other_replicas(s.node_id, s.step, s.dead)
        # nor, for DRAIN_LINGER_S, while one is behind us: it needs our state to resync, then
        # our round (found by the harness: its round a step behind failed ours, and we left
        # with our share). Bounded: a joiner that never comes must not keep us (a review)
        behind = c.view.unfinished_replicas(s.node_id, s.step, c.presumed_dead_set())
        failing = s.round_fail_since is not None
        waits = behind and failing and c.now - s.round_fail_since < DRAIN_LINGER_S
        if failing and not others and not waits:  # they finished, or are gone
            log.info("stage %d: leaving: no replica is left to average with", c.k)
            return "drained"
        return None

    def idle(self) -> bool:
        """Nothing of this step was started here: a draining node may leave at once."""
        L = self.c.state.ledger
        mine = L.share  # stage 0: a share of this step is ours until a round says we leave
        busy = L.counted or self.c.runtime.pending or L.sent_to or L.came_from
        # overlapped: the next step's work we took is ours to finish too (stepend.finish)
        return not (busy or self.c.state.early or mine or self.c.state.holds_ahead())

    def lingering(self) -> bool:
        """Finished (or drained), but stay while someone may still need us. A neighbour that
        has not finished: if one of its stage's replicas dies in the last step, the adopter
        needs what we hold of that step (our last ledger). A replica of our stage that is
        behind: its last round failed and it needs a replica's state. A finished neighbour
        says so (a leaving notice); one that is stuck is waited out for round_timeout_s, as
        long as it would wait for its own round. A drained node waits only for its stage's
        replicas, and at most DRAIN_LINGER_S (found by the harness: everyone else had left,
        nobody re-sent a dead replica's microbatches, and a replica whose last round failed
        had nobody left to resync from)."""
        c, s = self.c, self.c.state
        if not c.view.dynamic:
            return False  # a fixed pipeline has no replica to take over a dead one's work
        # a stop (Ctrl-C) waits too: what is left of the run needs us; the daemon's stop
        # grace (and a second signal) bound it
        self.say_leaving()  # route nothing here; our round, and our work, are done
        s.finished_at = s.finished_at if s.finished_at is not None else c.now
        self.recovery.retry_orphans()  # a death seen now: report it to the adopter
        self.flow.tell_owed_done()  # to a neighbour that relinked after a flap
        if s.drained or s.draining:  # (a stop, too: the daemon's stop grace is 60 s) a
            # suspect's fate is known within record_ttl_s + 2 refresh_s
            limit = DRAIN_LINGER_S + c.cfg.record_ttl_s + 2 * c.cfg.refresh_s
        else:
            limit = c.cfg.round_timeout_s
        return bool(self.unfinished() or self.owed_upstream()) and c.now - s.finished_at < limit

    def owed_upstream(self) -> bool:
        """Does upstream still need what we hold of the steps we applied? Until an upstream
        replica has applied such a step, its death leaves its adopter to redo its share with
        the gradients we sent it, which only we hold: a draining replica stays (bounded by
        lingering's limit) while an upstream record is not past the last step we sent
        gradients in (this one too, if the stage applied it without us: _behind). Found by
        the harness: a drained replica left with them, and the stage-0 replica they were for
        died at its round (1f1b seed 673, the known gap until then; overlapped seed 739)."""
        c, s = self.c, self.c.state
        if c.is_first or not c.view.dynamic:
            return False
        steps = [L.step for L in s.kept() if L.grad_in]
        if not steps:
            return False
        dead, last = c.presumed_dead_set(), max(steps)
        return any(  # not a joiner's record: it holds none of that step's work
            r.step <= last and r.state is not NodeState.joining
            for p, r in c.view.stage(c.k - 1).items()
            if p not in dead
        )

    def unfinished(self) -> list[str]:
        """Who may still need us: replicas of our stage behind us, neighbours whose link broke
        (if one died, its adopter needs our replays) and, at the run's end, unfinished
        neighbours."""
        c, s = self.c, self.c.state
        behind = c.view.unfinished_replicas(s.node_id, s.step, c.presumed_dead_set())
        waiting = set(behind) | set(s.suspects)
        # one we averaged with that our view does not list (it joined after our last View):
        # wait for a View newer than our finish to tell whether it is behind
        unseen = {p for p in s.round_peers - {s.node_id} - s.dead if not c.view.listed(c.k, p)}
        if unseen and s.finished_at is not None and s.view_at <= s.finished_at:
            waiting |= unseen
        if not s.drained:
            waiting |= {p for p in s.links if s.has_live(p) and p not in s.leaving}
        return sorted(waiting)

    def stranded(self) -> int | None:
        """A neighbour stage with no replica left (none linked, none online in the DHT): the
        step cannot finish until one joins, so a draining node must not wait for it. None in a
        fixed pipeline, where a crashed neighbour is waited out (it may come back)."""
        c = self.c
        if not c.view.dynamic:
            return None
        for side, stage in (("up", c.k - 1), ("down", c.k + 1)):
            exists = 0 <= stage < c.n_stages
            gone = not self.c.state.live(side)
            if exists and gone and not c.view.any_online(stage, c.presumed_dead_set()):
                return stage
        return None

    def run_over(self, started: bool) -> bool:
        """Fixed pipeline (no DHT): when a neighbour stage left and none is left on that side,
        the run is over for everyone, at this step boundary. "Left" is a leaving notice *and* a
        closed link: a draining neighbour first finishes the step it is in, which needs us (a
        crash, with no notice, is waited out: the node may come back from its checkpoint)."""
        c, s = self.c, self.c.state
        if c.view.dynamic or not s.leaving or started:
            return False

        def gone(side: str) -> bool:
            peers = {p: i for p, i in s.links.items() if i.side == side}
            return (
                bool(peers)
                and not any(i.up for i in peers.values())
                and not s.leaving.isdisjoint(peers)
            )

        if (not c.is_first and gone("up")) or (not c.is_last and gone("down")):
            log.info("stage %d: a neighbour stage left; the run ends at step %d", c.k, s.step)
            return True
        return False

    def say_leaving(self) -> None:
        s = self.c.state
        if s.said_leaving:
            return
        s.said_leaving = True
        for peer in s.links:
            if s.has_live(peer):
                self.c.effects.append(Send(peer, Notice(NK.leaving, s.step, (), s.node_id)))
        self.c.effects.append(Announce(leaving=True))
