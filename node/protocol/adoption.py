"""Exact recovery, the adopter's side: a replica of the dead node's stage takes the reports of
its neighbours (recovery.py) and recomputes the dead node's share of the step from them.
"""

from __future__ import annotations

from node.data import DataMismatchError, Microbatch, MicrobatchId
from node.protocol.core import Core, adopter_rank, log
from node.protocol.flow import DataFlow
from node.protocol.redo import PastRedo
from node.protocol.state import Adoption
from node.wire.messages import Backward, Forward, MessageError, Notice, held_bytes
from node.wire.messages import NoticeKind as NK

MAX_ADOPTIONS = 64  # open adoptions (dead replica, step): a few per death, at most two steps
# open adoptions one neighbour's replays may open for ids no View listed (a joiner that died
# before our view caught up): a hostile neighbour's fresh ids filled all MAX_ADOPTIONS (#10 H5);
# and all neighbours together (keys are free: 16 neighbours x 4 filled them again, a review)
MAX_UNLISTED_PER_PEER = 4
MAX_UNLISTED = 16
# an adoption of a replica no View lists holds our step only if one listed it within this many
# record TTLs (its neighbours declare it dead once their View, refreshed as ours, drops it)
LATELY_TTLS = 2


class Adopter:
    def __init__(self, core: Core, flow: DataFlow):
        self.c, self.flow = core, flow
        self.past = PastRedo(core, flow)  # a dead replica's part of a step we applied

    def claimed(self) -> set[int]:
        """Ids of this step that a neighbour holds for a dead replica we adopt (not yet done)."""
        s = self.c.state
        return {
            i for (_, st), a in s.adoptions.items() if st == s.step and not a.done
            for i in a.claims
        }  # fmt: skip

    def adopt_left_shares(self) -> None:
        """Stage 0: our rounds fail, and a replica that the step's split gave a share to is
        gone from the DHT without anyone reporting it dead (it left without knowing it had a
        share: it had missed the round that made the split). The replica the neighbours would
        pick (`adopter_rank`) adopts its share; downstream's reports, if it did die, still come
        first (`ready` waits for them). Found by the harness."""
        c, s = self.c, self.c.state
        if not c.is_first or not s.synced or not s.group0 or s.round_fail_since is None:
            return
        if s.draining:
            return  # a replica that leaves adopts nothing (neighbours do not pick it either)
        online = c.view.online_replicas(s.node_id, s.dead) | {s.node_id}
        for owner, ids in s.split().items():
            key = (owner, s.step)
            if owner == s.node_id or key in s.adoptions or c.view.listed(0, owner):
                continue
            if min(online, key=lambda p, o=owner: adopter_rank(p, o)) != s.node_id:
                continue  # not ours to adopt: the same pick as downstream's (recovery.py)
            if owner not in s.seen_replicas:
                continue  # never listed yet (a joiner our view has not caught up with)
            if ids and not set(ids) <= s.ledger.counted:
                log.info(
                    "stage 0: %s left without its share of step %d: adopting it", owner, s.step
                )
                s.adoptions[key] = Adoption(owner, s.step, c.now)

    def holds_dispatch(self) -> bool:
        """Stage 0, overlapped: an adoption of this step still waits for downstream's reports.
        Until they are in, any id of our queue may be one the dead replica began early, and
        dispatched again it would be computed twice downstream (`claimed` is not complete)."""
        s = self.c.state
        return bool(self.c.schedule.overlap) and any(
            st == s.step and not a.done and a.confirmed for (_, st), a in s.adoptions.items()
        )

    def adoptions_open(self) -> bool:
        """Does an adoption hold this step's end? Not one of a replica our View still lists,
        nor one of an id no View listed lately (only a neighbour's word says it died: #10 M2)."""
        s = self.c.state
        return any(not a.done and a.confirmed for (_, st), a in s.adoptions.items() if st == s.step)

    def adoption(self, dead: str, step: int, by: str) -> Adoption | None:
        s = self.c.state
        if step < s.step and not self.redoes(step):
            return None  # that step is finished here: the dead node's part was counted
        # our own id: we are a restarted node and the neighbours hand us what our previous
        # process held (recomputing skips what this process already counted or holds)
        if not s.synced or s.has_live(dead) or not dead:
            s.errors["bad_replay"] += 1  # not ours to adopt (or a peer's nonsense)
            return None
        key = (dead, step)
        if key not in s.adoptions:
            # a peer's claim, bounded before we act on it (#10 H5): of this step or the next,
            # and within MAX_ADOPTIONS and the byte budget (a stranger named fresh ids, and each
            # held an adoption and its tensors). Not "an id the DHT listed": a joiner that dies
            # before our view lists it must be adopted too (a review's lagging views stalled)
            full = len(s.adoptions) >= MAX_ADOPTIONS or s.held_bytes() >= self.c.held_budget
            unlisted = dead not in s.seen_replicas and dead != s.node_id
            if unlisted:  # one neighbour's word alone: a few at a time
                opened = [a.opened_by for a in s.adoptions.values() if a.unlisted]
                full = full or len(opened) >= MAX_UNLISTED
                full = full or opened.count(by) >= MAX_UNLISTED_PER_PEER
            if step > s.step + 1 or full:
                s.errors["bad_replay"] += 1
                return None
            # a replica our View lists, said dead by a neighbour (it banned it, or lies): its
            # replays are kept and adopted when they are all in, but the adoption holds our
            # step only once no View lists it (a hostile neighbour's word stalled every step by
            # adopt_wait_s: #10 M2), and it is not dead to us until then. One no View listed
            # lately (a joiner that died before our View caught up, one long gone, or a name
            # made up) never holds it: no View will say anything more of it
            c, own = self.c, dead == s.node_id
            listed = c.view.dynamic and not own and c.view.listed(c.k, dead)
            last = s.seen_replicas.get(dead)
            lately = last is not None and c.now - last <= LATELY_TTLS * c.cfg.record_ttl_s
            holds = own or not c.view.dynamic or (lately and not listed)
            s.adoptions[key] = Adoption(
                dead, step, c.now, opened_by=by, unlisted=unlisted, confirmed=holds,
                listed=listed,
            )  # fmt: skip
            if not holds:
                s.stats["unconfirmed_deaths"] += 1
            if not (own or listed):
                s.mark_dead(dead, c.now)
            log.info("stage %d: adopting %s's part of step %d", self.c.k, dead, step)
        return s.adoptions[key]

    def redoes(self, step: int) -> bool:
        """May we still redo finished step `step`'s work for a dead replica of ours
        (redo.PastRedo)? The step just before ours, its ledger and weights kept."""
        c, s = self.c, self.c.state
        past = c.runtime.past
        return (
            step == s.step - 1
            and past is not None
            and past[0] == step
            and any(L.step == step for L in s.kept())
        )

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
        a = self.adoption(msg.replay_of, msg.id.step, peer)
        if a is not None and msg.id.index not in a.forwards:
            if not self.room_for(msg):
                return
            self.reopen(a, peer)
            a.put_forward(msg.id.index, msg, peer, msg.grad_needed)

    def on_replay_backward(self, peer: str, side: str, msg: Backward) -> None:
        if side != "down" or not 0 <= msg.id.index < self.c.M:
            self.c.state.errors["bad_replay"] += 1
            return
        a = self.adoption(msg.replay_of, msg.id.step, peer)
        if a is not None and msg.id.index not in a.claims and self.room_for(msg):
            self.reopen(a, peer)
            a.put_claim(msg.id.index, peer, msg.grad)

    def room_for(self, msg) -> bool:
        """May an adoption hold `msg` (a replayed forward or gradient)? Within the byte budget
        it shares with the early buffer (limits.max_held_mb, never below a recovery's burst)."""
        s = self.c.state
        if s.held_bytes() + held_bytes(msg) <= self.c.held_budget:
            return True
        s.errors["held_budget"] += 1
        return False

    def reopen(self, a: Adoption, peer: str) -> None:
        """A replay after the adoption was done: a neighbour whose link was down when the
        others reported (found by the harness: its microbatch was lost). Adopt again, once it
        said REPLAY_END; what was already recomputed is skipped."""
        if a.done:
            a.done, a.t0 = False, self.c.now
            a.reported.discard(peer)

    def late_forward(self, peer: str, msg: Forward) -> bool:
        """A forward of an id our adoption could not recompute (its upstream holder had died
        too: two deaths in a row), now recomputed by that holder's adopter. The dead replica's
        downstream holder already has its z: finish it from the claim, as the adoption would
        have (found by the harness: the new forward was refused downstream as a duplicate)."""
        s, i = self.c.state, msg.id.index
        for (_, step), a in s.adoptions.items():
            if step != msg.id.step or step != s.step or i in a.forwards:
                continue
            if i not in a.claims and i not in a.lost:  # lost: one no downstream replica
                continue  # held either (the last stage has none), redone upstream (redo.PastRedo)
            if a.done and i not in a.lost:
                continue
            if not self.room_for(msg):
                return True  # refused: the same as a replay over the budget
            a.put_forward(i, msg, peer, True)
            if a.done and i in a.lost:
                log.info("stage %d: microbatch %d of step %d came after all", self.c.k, i, step)
                self.recompute(a, i)
            return True  # an open adoption recomputes it with the claim when it runs
        return False

    def late_claim(self, peer: str, msg: Backward) -> bool:
        """A gradient that a claim promised, arriving before we processed the adoption."""
        for (_, step), a in self.c.state.adoptions.items():
            claim = a.claims.get(msg.id.index)
            if step == msg.id.step and not a.done and claim and claim[0] == peer:
                if self.room_for(msg):
                    a.put_claim(msg.id.index, peer, msg.grad)
                return True
        return False

    def on_replay_end(self, peer: str, side: str, msg: Notice) -> None:
        c, s = self.c, self.c.state
        prev = next((L for L in s.kept()[:-1] if L.step == msg.step), None)
        if side == "down" and prev is not None and not c.is_last:
            # a step we finished: its round covered every id, so every forward of it reached
            # the next stage. The dead replica's STEP_DONE may have died with it: say it for
            # the whole step (found by the harness: the neighbour waited for it forever)
            c.send(peer, Notice(NK.step_done, prev.step, tuple(range(c.M)), s.node_id))
        for step in [st for st in s.replay_ends if st < s.step]:
            del s.replay_ends[step]
        if s.step <= msg.step <= s.step + 2:  # a peer's input: bounded
            s.replay_ends.setdefault(msg.step, set()).add(peer)
        near = s.step <= msg.step <= s.step + 1 or self.redoes(msg.step)
        if not near or len(s.adoptions) >= MAX_ADOPTIONS:
            return  # a peer's input: no adoption for a far step, nor without bound (review)
        a = self.adoption(msg.peer, msg.step, peer)
        if a is not None:
            a.reported.add(peer)
            s.reported_on.setdefault(msg.peer, set()).add(peer)
            while len(s.reported_on) > MAX_ADOPTIONS:  # one per death: bounded all the same
                del s.reported_on[next(iter(s.reported_on))]

    def ready(self, a: Adoption) -> bool:
        c, s = self.c, self.c.state
        if c.is_first and not a.claims and not c.schedule.overlap:
            share = s.split().get(a.dead)
            if not share:
                return True  # it had no share of this step: nothing to redo
        # overlapped: it may have begun this step's first microbatches in the last one, and
        # died before its round said so (the split then gave them to us): only downstream's
        # reports say which it sent (overlapped harness seed 155, kills: dispatched twice)
        sides = [x for x, edge in (("up", c.is_first), ("down", c.is_last)) if not edge]
        # a draining neighbour still finishes its step and reports too: wait for it as well
        # (found by the harness: its replay came after the adoption and a microbatch was lost)
        expected = {p for x in sides for p in s.live(x)}
        # and one whose link to us is down for now: it reports when it is back (a flap)
        expected |= {p for p, (x, *_) in s.suspects.items() if x in sides and p != a.dead}
        # not one first linked to us after the dead one's link to us broke (a joiner): it
        # never held the dead one's work (if it did, its late report reopens the adoption).
        # Found by the harness: every death near a join cost adopt_wait_s
        known = s.lost_at.get(a.dead, a.t0)
        expected = {p for p in expected if p not in s.links or s.links[p].since <= known}
        flaps = {p for p, t in s.flaps.items() if c.now - t < c.cfg.adopt_wait_s}
        if a.dead == s.node_id and flaps:  # we saw our links flap: the peers at their other
            # ends report what the cuts lost; the others' links held and lost nothing (found
            # by the harness: a flap cost adopt_wait_s, 45 s). A restarted process saw no flap:
            # every neighbour of its old process reports to it, so it waits for all of them.
            expected &= flaps | a.reported
        if expected <= a.reported:
            return True
        if c.now - a.t0 > c.cfg.adopt_wait_s:
            s.stats["adopt_timeouts"] += 1  # a liveness cost: the harness counts these
            return True
        return False

    def process_adoptions(self) -> None:
        c, s = self.c, self.c.state
        for (_, step), a in list(s.adoptions.items()):
            if a.listed and not c.view.listed(c.k, a.dead):  # the View agrees now
                a.listed, a.confirmed = False, True
                s.mark_dead(a.dead, c.now, a.t0)
            if step == s.step and not a.done and self.ready(a):
                self.adopt(a)
            elif step < s.step and not a.done and self.redoes(step):
                if self.ready(a):
                    self.past.adopt(a)
            elif step < s.step:
                del s.adoptions[(a.dead, step)]
        if s.redone_in and not self.adoptions_open():  # what no claim named: never left the
            for i, (peer, msg) in sorted(s.redone_in.items()):  # dead one (redo.py): ours
                if i not in s.ledger.z_in and i not in s.ledger.counted:
                    self.flow.run_forward(peer, msg, redone=True)
            s.redone_in = {}

    def adopt(self, a: Adoption) -> None:
        c, s = self.c, self.c.state
        L, a.done = s.ledger, True
        for i in [i for i in s.redone_in if i in a.claims and i not in a.forwards]:
            peer, msg = s.redone_in.pop(i)  # a z its dead upstream holder's adopter redid
            a.put_forward(i, msg, peer, False)
        if a.dead == s.node_id:
            self.redeliver(a)
        ids = set(a.forwards) | set(a.claims)
        if c.is_first and s.group0 and a.dead != s.node_id:  # our own share: dispatched as
            share = s.split().get(a.dead, [])  # ever, not recomputed
            ids |= set(share)
            L.share.extend(i for i in share if i not in L.share)
        if c.is_first and a.dead != s.node_id:
            self.take_over_claims(a)
            # its share of the next step may be in the pipeline too: dispatch that step only
            # once downstream said what it holds of it (Recovery.hold_dispatch). A neighbour
            # that reported on the dead one already told all it holds: it reports every step
            # it had begun, and what the dead one sent for later steps was dropped at its
            # death (found in a real swarm: every step after an adoption waited adopt_wait_s
            # for a report of a step that nobody held)
            s.hold_next, s.hold_for = True, a.dead
        redo = sorted(
            i
            for i in ids
            if i not in L.counted and MicrobatchId(s.step, i) not in c.runtime.pending
        )
        log.info("stage %d: recomputing %d microbatches of %s: %s", c.k, len(redo), a.dead, redo)
        for i in redo:
            self.recompute(a, i)
        c.emit("adopted", stage=c.k, node=s.node_id, dead=a.dead, step=s.step, ids=redo)

    def take_over_claims(self, a: Adoption) -> None:
        """Stage 0 dispatched a microbatch that a dead replica had dispatched too (we formed
        the step's split without it: its round info never reached us), and downstream refused
        ours as a duplicate. Its holder has the dead one's z, which equals ours (same seeded
        microbatch, same weights): it answers to us now (found by the harness)."""
        c, s = self.c, self.c.state
        L = s.ledger
        for i, (holder, grad) in sorted(a.claims.items()):
            mid = MicrobatchId(s.step, i)
            if i in L.counted or i in L.grad_out or mid not in c.runtime.pending:
                continue
            L.sent_to[i] = holder
            if grad is not None:
                self.flow.on_backward(holder, "down", Backward(mid, grad))

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
            elif grad is not None and mid in c.runtime.pending:
                # its link broke again before we applied it: forget the claim, so that the
                # holder's replay after the relink reopens the adoption (kept, the replay was
                # taken for a duplicate and the gradient never applied: a review, with two
                # flaps of one link and messages in batches)
                a.drop_claim(i)

    def recompute(self, a: Adoption, i: int) -> None:
        c, s = self.c, self.c.state
        L = s.ledger
        if c.is_first:
            mb, z, f = c.batches.microbatch(s.step, i), None, None
        else:
            f = a.forwards.get(i)
            if f is None:  # nobody upstream holds it (yet: see late_forward)
                s.stats["lost"] += 1
                a.lost.add(i)
                log.error("stage %d: microbatch %d of step %d is lost", c.k, i, s.step)
                return
            if i in a.lost:  # it came after all (a reopened adoption, a late forward)
                a.lost.discard(i)
                s.stats["lost"] -= 1
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
