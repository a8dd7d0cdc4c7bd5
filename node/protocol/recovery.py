"""Exact recovery when a replica dies mid-step.

Every neighbour of the dead node N re-sends what it holds of N's microbatches (kept in its step
ledger until the step after next begins) to one surviving replica of N's stage, the adopter:

- an upstream neighbour re-sends the z it had sent N (`Forward`, replay_of=N; grad_needed says
  whether it still waits for that microbatch's dL/dz);
- a downstream neighbour re-sends the dL/dz it had sent N, or a claim without a gradient if it
  has not computed it yet (`Backward`, replay_of=N), and from then on sends it to the adopter;
- each ends with REPLAY_END.

The adopter then recomputes N's share of the step from those tensors: forward (and backward where
the gradient is known), sending on only what the pipeline still lacks. Replicas hold identical
weights within a step, so the recomputed gradients are the ones N had computed: the step's update
equals the one without the failure. Stage 0's ids need no upstream: they derive from the seed, and
the dead replica's share is known to every stage-0 replica (`split_share`).

A broken link alone is not a death: the peer is a suspect until a DHT view newer than the break
no longer lists it (its record lapses record_ttl_s after its last refresh), or the link comes
back (a flap: the peer itself is re-sent what the cut may have lost).

All neighbours pick the same adopter: the first by `adopter_rank` (a hash of its id and the dead
one's) among the stage's online replicas that they are linked to, or were until a link broke
(then the report waits for it). If no replica of that stage is left, the reports wait until one
links (the swarm pauses).
"""

from __future__ import annotations

from node.data import MicrobatchId
from node.errors import NodeFailed
from node.ledger import StepLedger
from node.protocol.core import Core, adopter_rank, log
from node.protocol.flow import DataFlow
from node.wire.messages import Backward, Forward, Notice
from node.wire.messages import NoticeKind as NK

BANNED_REASON = "banned"  # a LinkDown with this reason: we banned the peer (node/guard.py)


class Recovery:
    """As a neighbour of a dead (or suspect) replica: detect the death, report its work."""

    def __init__(self, core: Core, flow: DataFlow):
        self.c, self.flow = core, flow

    def hold_dispatch(self) -> bool:
        """A stage-0 node that took over a stage with no replica left (from a checkpoint) waits
        before dispatching its step until each downstream replica has said what it holds of
        the dead node's microbatches (REPLAY_END): the microbatches the dead node had already
        sent are recomputed from those claims, not sent again (a second forward of one id is
        refused). A downstream node that never saw the death sends nothing: wait adopt_wait_s."""
        s = self.c.state
        if s.hold_until is None:
            return False
        downs = {p for p in s.live("down") if p not in s.leaving}
        heard = s.replay_ends.get(s.step, set())
        if s.hold_for is not None:  # a neighbour that reported on the dead one told all it
            heard = heard | s.reported_on.get(s.hold_for, set())  # holds (adoption.adopt)
        if (downs and downs <= heard) or self.c.now > s.hold_until:
            if self.c.now > s.hold_until:
                s.stats["hold_timeouts"] += 1  # a liveness cost: the harness counts these
            s.hold_until = None
            return False
        return True

    def on_link_down(self, peer: str, side: str, reason: str, started: bool) -> None:
        c, s = self.c, self.c.state
        if not peer or peer in s.dead:
            return
        if s.has_live(peer):  # linked again before we got here: the link flapped
            if c.view.dynamic and peer not in s.leaving:
                self.flapped(peer, side, reason)
            return
        if peer in s.leaving and not (c.view.dynamic and self.owes(peer, side)):
            log.info("stage %d: %s left", c.k, peer)
            return
        # else it left holding our work (of a step it was not in): a suspect like any other,
        # dead once its record is gone (it may still be lingering; review)
        if not c.view.dynamic:  # a fixed pipeline: no replica can take over
            carried = any(  # this step's work, or the next one's begun early (overlapped)
                peer in (L.sent_to if side == "down" else L.came_from).values()
                for L in (s.ledger, s.ahead)
                if L is not None
            )
            # mid-run, the link that carries our work is gone. Not a link that never carried
            # any while another to that stage is up: anyone can complete a Hello and hang up,
            # and that stopped the node (review, #10 H7)
            if carried or (started and not s.live(side)):
                stage = c.k + (1 if side == "down" else -1)
                raise NodeFailed(f"the link to {peer} (stage {stage}) closed mid-run: {reason}")
            log.info("stage %d: link to %s closed: %s", c.k, peer, reason)
            return
        if reason.startswith(BANNED_REASON):  # we refuse it: it will not be back, whatever
            self.declare_dead(peer, side, reason)  # the DHT says; its work is redone
            return
        if peer not in s.suspects:
            c.emit("link_lost", stage=c.k, node=s.node_id, peer=peer, step=s.step, reason=reason)
            log.warning(
                "stage %d: lost the link to %s: %s (it counts as dead if its DHT record "
                "expires before the link is back)",
                c.k,
                peer,
                reason,
            )
        s.suspects[peer] = (side, reason, c.now, None)
        self.check_suspects()

    def owes(self, peer: str, side: str) -> bool:
        """Does a downstream `peer` hold a forward of ours with no gradient back yet, or may it
        hold one of a dead replica we adopt? A replica that drains finishes its own step, but
        may leave a step behind its siblings, holding forwards of the next one that it never
        ran (found by the harness)."""
        s = self.c.state
        if side != "down":
            return False
        if any(
            not a.done and a.confirmed and a.dead != s.node_id and a.step >= s.step
            and peer not in a.reported
            for a in s.adoptions.values()
        ):  # fmt: skip
            return True  # it may hold a dead replica's work we adopt, and report it when its
            # link is back (a flap; found by the harness, overlapped seed 1963: taken for gone,
            # it was not waited for, and the adopter recomputed two ids it held)
        return any(
            dst == peer and i not in L.grad_out
            for L in (*s.kept(), s.ahead)
            if L is not None
            for i, dst in L.sent_to.items()
        )

    def check_suspects(self) -> None:
        """A lost link is a death only once the peer's DHT record is gone too (it lapses
        record_ttl_s after the last refresh): a broken link alone may be a flap that one side
        saw and the other did not, and taking a live peer for dead has its work done twice,
        which no averaging round can undo (found by the harness). A restarted node under the
        same id relinks, and is handed what its old process held (`flapped`)."""
        c, s = self.c, self.c.state
        for peer, (side, reason, since, absent) in list(s.suspects.items()):
            stage = c.k + (1 if side == "down" else -1)
            if s.has_live(peer):
                del s.suspects[peer]
                if peer not in s.leaving:
                    self.flapped(peer, side, reason)
            elif peer in s.dead or (peer in s.leaving and not self.owes(peer, side)):
                del s.suspects[peer]
            elif c.view.listed(stage, peer) or s.view_at <= since:
                s.suspects[peer] = (side, reason, since, None)
            elif absent is None:  # absent from a view newer than the break: once more, to be
                s.suspects[peer] = (side, reason, since, s.views)  # sure (a slow refresh)
            elif s.views > absent:
                del s.suspects[peer]
                self.declare_dead(peer, side, reason, since)

    def declare_dead(self, peer: str, side: str, reason: str, since: float | None = None) -> None:
        c, s = self.c, self.c.state
        self.c.state.mark_dead(peer, self.c.now, since)
        s.stats["deaths_seen"] += 1
        # what it sent for the next step is void: its adopter re-sends or recomputes it
        s.keep_early(lambda ev: ev.peer != peer)
        # and its word on this step: the gradients it said it holds died with it, so our update
        # waits for its adopter's STEP_DONE, which comes once they are redone (with our kept
        # gradients: had we applied on its word, our own death or drain would lose them)
        for L in (s.ledger, s.ahead):
            if L is not None and side == "up":
                L.done_from.pop(peer, None)
                L.fwd_from.pop(peer, None)
        stage = c.k + (1 if side == "down" else -1)
        log.warning("stage %d: %s (stage %d) is gone: %s", c.k, peer, stage, reason)
        c.emit("peer_lost", stage=c.k, node=s.node_id, peer=peer, step=s.step)
        self.report(peer, side, first=True)

    def flapped(self, peer: str, side: str, reason: str) -> None:
        """The same peer is linked again: re-send it what the cut may have lost (it
        redelivers, see redeliver), and the STEP_DONEs it may not have heard."""
        s = self.c.state
        log.warning("stage %d: the link to %s broke (%s) and is back", self.c.k, peer, reason)
        s.flaps[peer] = self.c.now  # it reports to us what the cut lost (Adopter.ready)
        for L in s.kept():
            L.done_told.discard(peer)
            L.fwd_told.discard(peer)
        self.report(peer, side, to=peer)

    def adopter(self, side: str, dead: str) -> str | None:
        """The first, by `adopter_rank` for `dead`, of the stage's online replicas that we are
        linked to, or were until a link broke (a suspect): every neighbour must pick the same
        one (the rank is a hash of both ids: a node that ground a low id does not win every
        adoption, #10 H2), and a flap on one of
        our links must not change our pick (found by the harness: two adopters redid the same
        microbatches). If the pick's link is down, the report waits until it is back (or the
        pick is found dead, and the next one is picked)."""
        c, s = self.c, self.c.state
        stage = c.k + (1 if side == "down" else -1)
        known = {p for p, info in s.links.items() if info.side == side}
        candidates = [
            p
            for p in known
            if p not in s.leaving and p not in s.dead and c.view.online(stage, p)
            and (s.has_live(p) or p in s.suspects)
        ]  # fmt: skip
        pick = min(candidates, key=lambda p: adopter_rank(p, dead)) if candidates else None
        return pick if pick is not None and s.has_live(pick) else None

    def report(self, dead: str, side: str, first: bool = False, to: str | None = None) -> None:
        """`to`: the dead node itself, linked again (a cut, or a restart under the same id)."""
        c, s = self.c, self.c.state
        adopter = to or self.adopter(side, dead)
        if adopter is None:
            if first:  # retried every pump: say it once
                log.warning(
                    "stage %d: no replica of stage %d is linked to take over %s's work: "
                    "paused until one is",
                    c.k,
                    c.k + (1 if side == "down" else -1),
                    dead,
                )
            s.orphans.append((dead, side))
            return
        for L in (*s.kept(), s.ahead):  # ahead: overlapped's next step
            if L is None:
                continue
            sent = self.replay_to(adopter, dead, side, L)
            c.send(adopter, Notice(NK.replay_end, L.step, (), dead))
            if sent:
                log.info(
                    "stage %d: re-sent %d microbatches of step %d from %s to %s",
                    c.k,
                    sent,
                    L.step,
                    dead,
                    adopter,
                )
        if side == "up" and c.k == 1:  # a dead stage-0 replica: its adopter may be a step
            # ahead of us already, with the dead one's share of that step to dispatch
            c.send(adopter, Notice(NK.replay_end, s.ledger.step + 1, (), dead))

    def replay_to(self, adopter: str, dead: str, side: str, L: StepLedger) -> int:
        sent = 0
        if side == "down":  # we had sent the dead node these z
            for i, dst in list(L.sent_to.items()):
                if dst == dead:
                    f = L.z_out[i]
                    msg = Forward(
                        f.id, f.z, f.offsets, f.data_fingerprint, dead, i not in L.grad_out
                    )
                    self.c.send(adopter, msg)
                    L.sent_to[i] = adopter
                    L.replayed.add(i)
                    sent += 1
        else:  # the dead node had sent us these z: give its adopter our dL/dz (or a claim)
            for i, src in list(L.came_from.items()):
                if src == dead:
                    self.c.send(adopter, Backward(MicrobatchId(L.step, i), L.grad_in.get(i), dead))
                    L.came_from[i] = adopter
                    sent += 1
        return sent

    def retry_orphans(self) -> None:
        s = self.c.state
        self.check_suspects()
        for peer in [p for p in s.dead if s.has_live(p)]:
            s.dead.discard(peer)  # linked again: a restarted node, or the same one after
            s.reported_on.pop(peer, None)  # its next death is reported anew (review)
            for L in s.kept():  # a flap: our STEP_DONE may be lost
                L.done_told.discard(peer)
                L.fwd_told.discard(peer)
        orphans, s.orphans = s.orphans, []
        for dead, side in orphans:  # to the same node when it is back: it still holds its work
            self.report(dead, side, to=dead if s.has_live(dead) else None)
