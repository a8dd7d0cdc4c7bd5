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

All neighbours pick the same adopter (the lowest node id among the stage's linked replicas). If
no replica of that stage is left, the reports wait until one links (the swarm pauses).
"""

from __future__ import annotations

from node.data import DataMismatchError, Microbatch, MicrobatchId
from node.errors import NodeFailed
from node.ledger import StepLedger
from node.protocol.core import Core, log
from node.protocol.flow import DataFlow
from node.protocol.state import Adoption
from node.swarm.routing import split_share
from node.wire.messages import Backward, Forward, MessageError, Notice
from node.wire.messages import NoticeKind as NK


class Recovery:
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
        if (downs and downs <= heard) or self.c.now > s.hold_until:
            s.hold_until = None
            return False
        return True

    def mark_dead(self, peer: str) -> None:
        self.c.state.dead.add(peer)
        self.c.state.dead_at[peer] = self.c.now

    def adoptions_open(self) -> bool:
        s = self.c.state
        return any(not a.done for (_, st), a in s.adoptions.items() if st == s.step)

    # ---- as a neighbour of the dead node ---------------------------------------------------
    def on_link_down(self, peer: str, side: str, reason: str, started: bool) -> None:
        c, s = self.c, self.c.state
        if not peer or peer in s.dead:
            return
        if s.has_live(peer):  # linked again before we got here: the link flapped
            if c.view.dynamic and peer not in s.leaving:
                self.flapped(peer, side, reason)
            return
        if peer in s.leaving:
            log.info("stage %d: %s left", c.k, peer)
            return
        if not c.view.dynamic:  # a fixed pipeline: no replica can take over
            L = s.ledger
            if peer in (L.sent_to if side == "down" else L.came_from).values() or started:
                stage = c.k + (1 if side == "down" else -1)
                raise NodeFailed(f"the link to {peer} (stage {stage}) closed mid-run: {reason}")
            log.info("stage %d: link to %s closed: %s", c.k, peer, reason)
            return
        self.mark_dead(peer)
        s.stats["deaths_seen"] += 1
        # what it sent for the next step is void: its adopter re-sends or recomputes it
        s.early = [ev for ev in s.early if ev.peer != peer]
        stage = c.k + (1 if side == "down" else -1)
        log.warning("stage %d: %s (stage %d) is gone: %s", c.k, peer, stage, reason)
        c.emit("peer_lost", stage=c.k, node=s.node_id, peer=peer, step=s.step)
        self.report(peer, side, first=True)

    def flapped(self, peer: str, side: str, reason: str) -> None:
        """The same peer is linked again: re-send it what the cut may have lost (it
        redelivers, see redeliver), and the STEP_DONEs it may not have heard."""
        s = self.c.state
        log.warning("stage %d: the link to %s broke (%s) and is back", self.c.k, peer, reason)
        for L in (s.prev_ledger, s.ledger):
            if L is not None:
                L.done_told.discard(peer)
        self.report(peer, side, to=peer)

    def adopter(self, side: str) -> str | None:
        c, s = self.c, self.c.state
        stage = c.k + (1 if side == "down" else -1)
        live = [
            p
            for p in s.live(side)
            if p not in s.leaving and p not in s.dead and c.view.online(stage, p)
        ]
        return min(live) if live else None

    def report(self, dead: str, side: str, first: bool = False, to: str | None = None) -> None:
        """`to`: the dead node itself, linked again (a cut, or a restart under the same id)."""
        c, s = self.c, self.c.state
        adopter = to or self.adopter(side)
        if adopter is None:
            if first:  # retried every pump: say it once
                log.warning(
                    "stage %d: no replica of stage %d is left: paused until one joins",
                    c.k,
                    c.k + (1 if side == "down" else -1),
                )
            s.orphans.append((dead, side))
            return
        for L in (s.prev_ledger, s.ledger):
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
        for peer in [p for p in s.dead if s.has_live(p)]:
            s.dead.discard(peer)  # linked again: a restarted node, or the same one after
            for L in (s.prev_ledger, s.ledger):  # a flap: our STEP_DONE may be lost
                if L is not None:
                    L.done_told.discard(peer)
        orphans, s.orphans = s.orphans, []
        for dead, side in orphans:  # to the same node when it is back: it still holds its work
            self.report(dead, side, to=dead if s.has_live(dead) else None)

    # ---- as the adopter ------------------------------------------------------------------
    def adoption(self, dead: str, step: int) -> Adoption | None:
        s = self.c.state
        if step < s.step:
            return None  # that step is finished here: the dead node's part was counted
        # our own id: we are a restarted node and the neighbours hand us what our previous
        # process held (recomputing skips what this process already counted or holds)
        if not s.synced or s.has_live(dead) or not dead:
            s.errors["bad_replay"] += 1  # not ours to adopt (or a peer's nonsense)
            return None
        key = (dead, step)
        if key not in s.adoptions:
            s.adoptions[key] = Adoption(dead, step, self.c.now)
            if dead != s.node_id:
                self.mark_dead(dead)
            log.info("stage %d: adopting %s's part of step %d", self.c.k, dead, step)
        return s.adoptions[key]

    def on_replay_forward(self, peer: str, side: str, msg: Forward) -> None:
        c = self.c
        if side != "up" or msg.z is None or not 0 <= msg.id.index < c.M:
            c.state.errors["bad_replay"] += 1
            return
        try:
            c.batches.check(Microbatch(msg.id, msg.offsets, msg.data_fingerprint))
        except DataMismatchError as err:  # another corpus: a config problem, not garbage
            c.refuse(peer, MessageError(msg.id, "FAILED_PRECONDITION", str(err)))
            return
        except ValueError as err:
            c.refuse(peer, MessageError(msg.id, "INVALID_ARGUMENT", str(err)))
            return
        a = self.adoption(msg.replay_of, msg.id.step)
        if a is not None and not a.done:
            a.forwards[msg.id.index] = msg
            a.up_of[msg.id.index] = peer
            a.grad_needed[msg.id.index] = msg.grad_needed

    def on_replay_backward(self, peer: str, side: str, msg: Backward) -> None:
        if side != "down" or not 0 <= msg.id.index < self.c.M:
            self.c.state.errors["bad_replay"] += 1
            return
        a = self.adoption(msg.replay_of, msg.id.step)
        if a is not None and not a.done:
            a.claims[msg.id.index] = (peer, msg.grad)

    def late_claim(self, peer: str, msg: Backward) -> bool:
        """A gradient that a claim promised, arriving before we processed the adoption."""
        for (_, step), a in self.c.state.adoptions.items():
            claim = a.claims.get(msg.id.index)
            if step == msg.id.step and not a.done and claim and claim[0] == peer:
                a.claims[msg.id.index] = (peer, msg.grad)
                return True
        return False

    def on_replay_end(self, peer: str, side: str, msg: Notice) -> None:
        c, s = self.c, self.c.state
        prev = s.prev_ledger
        if side == "down" and prev is not None and msg.step == prev.step and not c.is_last:
            # a step we finished: its round covered every id, so every forward of it reached
            # the next stage. The dead replica's STEP_DONE may have died with it: say it for
            # the whole step (found by the harness: the neighbour waited for it forever)
            c.send(peer, Notice(NK.step_done, prev.step, tuple(range(c.M)), s.node_id))
        for step in [st for st in s.replay_ends if st < s.step]:
            del s.replay_ends[step]
        if s.step <= msg.step <= s.step + 2:  # a peer's input: bounded
            s.replay_ends.setdefault(msg.step, set()).add(peer)
        a = self.adoption(msg.peer, msg.step)
        if a is not None:
            a.reported.add(peer)

    def ready(self, a: Adoption) -> bool:
        c, s = self.c, self.c.state
        if c.is_first and not a.claims:
            share = split_share(s.group0 or [], c.M).get(a.dead)
            if not share:
                return True  # it had no share of this step: nothing to redo
        sides = [x for x, edge in (("up", c.is_first), ("down", c.is_last)) if not edge]
        # a draining neighbour still finishes its step and reports too: wait for it as well
        # (found by the harness: its replay came after the adoption and a microbatch was lost)
        expected = {p for x in sides for p in s.live(x)}
        waited = c.now - a.t0 > c.cfg.adopt_wait_s
        return expected <= a.reported or waited

    def process_adoptions(self) -> None:
        s = self.c.state
        for (_, step), a in list(s.adoptions.items()):
            if step == s.step and not a.done and self.ready(a):
                self.adopt(a)
            elif step < s.step:
                del s.adoptions[(a.dead, step)]

    def adopt(self, a: Adoption) -> None:
        c, s = self.c, self.c.state
        L, a.done = s.ledger, True
        if a.dead == s.node_id:
            self.redeliver(a)
        ids = set(a.forwards) | set(a.claims)
        if c.is_first and s.group0:
            share = split_share(s.group0, c.M).get(a.dead, [])
            ids |= set(share)
            L.share.extend(i for i in share if i not in L.share)
        redo = sorted(
            i
            for i in ids
            if i not in L.counted and MicrobatchId(s.step, i) not in c.runtime.pending
        )
        log.info("stage %d: recomputing %d microbatches of %s: %s", c.k, len(redo), a.dead, redo)
        for i in redo:
            self.recompute(a, i)
        c.emit("adopted", stage=c.k, node=s.node_id, dead=a.dead, step=s.step, ids=redo)

    def redeliver(self, a: Adoption) -> None:
        """Our own id came back to us: a neighbour took us for dead when our link to it broke
        (a flapping link, a NAT mapping dropped) and re-sent what it held of ours. This process
        still holds its step, so nothing is recomputed twice: what the cut lost is delivered.
        Upstream re-sent a z we had computed and it still needs the gradient: send that again.
        Downstream re-sent a gradient we are still waiting for: apply it. (A z we never got is
        recomputed below, as for a restarted node.)"""
        c, s = self.c, self.c.state
        L = s.ledger
        for i in sorted(a.forwards):
            if i in L.counted and a.grad_needed.get(i, True) and i in L.grad_in:
                self.flow.grad_upstream(i)
        for i, (holder, grad) in sorted(a.claims.items()):
            mid = MicrobatchId(s.step, i)
            linked = s.live("down").get(holder) is not None
            if grad is not None and linked and mid in c.runtime.pending:
                self.flow.on_backward(holder, "down", Backward(mid, grad))

    def recompute(self, a: Adoption, i: int) -> None:
        c, s = self.c, self.c.state
        L = s.ledger
        if c.is_first:
            mb, z, f = c.batches.microbatch(s.step, i), None, None
        else:
            f = a.forwards.get(i)
            if f is None:  # nobody upstream held it: it cannot be recomputed exactly
                s.stats["lost"] += 1
                log.error("stage %d: microbatch %d of step %d is lost", c.k, i, s.step)
                return
            mb, z = Microbatch(f.id, f.offsets, f.data_fingerprint), f.z
            L.came_from[i], L.z_in[i] = a.up_of[i], f
            if not a.grad_needed.get(i, True):
                L.no_grad_back.add(i)
        L.recomputed += 1
        s.stats["recomputed"] += 1
        if c.is_last:
            self.flow.last_stage(i, mb, z)
            return
        z_out = c.compute(c.runtime.forward, mb, z)
        fwd = Forward(mb.id, z_out, mb.offsets, mb.fingerprint if f is None else f.data_fingerprint)
        claim = a.claims.get(i)
        if claim is None:  # the pipeline never got past the dead node: carry on as normal
            if c.is_first and i in L.queue:
                L.queue.remove(i)
            self.flow.send_forward(i, fwd)
            return
        holder, grad = claim
        L.sent_to[i], L.z_out[i] = holder, fwd
        if c.is_first and i in L.queue:
            L.queue.remove(i)
        if grad is None:
            return  # the holder sends the gradient here when it has it
        grad_in = c.compute(c.runtime.backward, mb.id, grad)
        L.grad_out[i] = grad
        self.flow.count(i)
        if grad_in is not None:
            L.grad_in[i] = grad_in
            self.flow.grad_upstream(i)
