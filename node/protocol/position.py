"""Where a stage stands among its neighbours' and replicas' steps: how far ahead a neighbour's
data may normally be, whether a far step is refused unseen, and when our weights are stale
enough to resync. A peer's step is a claim: it moves us only where the DHT's sealed records
agree (#10 H1), never on one message.
"""

from __future__ import annotations

from node.protocol.core import Core

BEHIND_IDLE_S = 5.0  # one step behind, idle, next-step work waiting: this long, then resync


class Position:
    def __init__(self, core: Core):
        self.c = core

    def reach(self) -> int:
        """How many steps ahead of ours a neighbour's data may be when it is normal. One for
        1f1b. Overlapped: our STEP_DONEs may wait unhandled in the events (a batch, or the
        machine's backlog) that carry what a neighbour sent after them, and it may have gone on
        meanwhile: stage 0 begins step t+2 once step t's gradients are back (two), and with the
        whole step begun early (overlap = M) it may finish t+1 at once, and begin t+3 (three;
        found by a review, with batches of messages as the daemon delivers them). Such data is
        held until we are there.
        """
        D = self.c.schedule.overlap
        return 1 + (D > 0) + (D >= self.c.M)

    def refuses(self, peer: str, side: str, step: int) -> str | None:
        """Why a neighbour's data of `step` would be refused unseen (the link then refuses it
        before decoding it): a far step the DHT does not vouch for. None: let it in."""
        c, s = self.c, self.c.state
        # only a synced node judges: one not yet placed (a restart resuming from its
        # checkpoint) takes its neighbours' replays of later steps (found by CI: refused, they
        # were lost and the swarm stalled)
        if (
            c.view.dynamic
            and s.synced
            and step > s.step + self.reach()
            and not self.vouched(peer, side, step)
        ):
            return f"this stage is at step {s.step}, and the DHT says no different"
        return None

    def vouched(self, peer: str, side: str, step: int) -> bool:
        """May a neighbour's data of a far `step` make us resync? Only if the DHT's sealed
        records agree we are behind: our stage's replicas agree they are ahead of us, or the
        sender's stage's replicas agree they are near that step (records lag a refresh;
        view.agreed_step). One stranger's forward of step 10^5 made a node resync at every
        message, and the swarm stopped (#10 H1; resbm bench flood); then its own record of a
        far step did, as one of its stage's replicas (a lone replica's record is its stage's
        word)."""
        c, s = self.c, self.c.state
        ours = c.view.agreed_step(c.k, s.node_id, s.dead)
        if ours is not None and ours >= s.step + 1:
            return True
        stage = c.k - 1 if side == "up" else c.k + 1
        theirs = c.view.agreed_step(stage, s.node_id, s.dead)
        return theirs is not None and theirs >= step - 1

    def behind(self) -> bool:
        """Our weights are stale and we must resync: our stage's replicas agree they are two
        or more steps ahead (two vouch for one state there, or the only other one does:
        view.agreed_step; they applied updates without us: we missed their rounds), or one is
        ahead while either our averaging rounds fail (a round that completed for the others but
        not for us: a round is not atomic) or we hold none of our step's work
        and upstream already sends the next step's (a replica that applied the step alone
        while we were joining). Being one step behind is normal for a moment at every step's
        end, so it counts only once it has lasted BEHIND_IDLE_S."""
        c, s = self.c, self.c.state
        if not c.view.dynamic:
            return False
        ahead = c.view.steps_ahead(s.node_id, s.step, s.dead)
        agreed = c.view.agreed_step(c.k, s.node_id, s.dead)
        if agreed is not None and agreed >= s.step + 2:  # records agree, not one claim (H1)
            return True
        L = s.ledger
        holds = L.counted or c.runtime.pending or L.sent_to or L.came_from
        # idle: the next step's work is waiting, or there is no next step (they finished)
        last = s.step == c.cfg.steps - 1
        idle = not c.is_first and (s.early or last) and not holds
        missed = s.round_fail_since is not None  # our rounds fail: the others applied it
        if not (any(d >= 1 for d in ahead) and (idle or missed)):  # a joiner left behind too
            s.behind_since = None
            return False
        s.behind_since = s.behind_since or c.now
        return c.now - s.behind_since >= BEHIND_IDLE_S
