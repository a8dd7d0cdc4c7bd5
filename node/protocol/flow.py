"""The data path of a stage: stage 0's dispatch, forwards, backwards, STEP_DONE notices.

Every message from a peer is checked before anything of it is applied; a refusal tells the peer
why (its gRPC status name) and changes nothing here.
"""

from __future__ import annotations

from node.data import DataMismatchError, Microbatch, MicrobatchId
from node.ledger import StepLedger
from node.protocol.core import Core, log
from node.protocol.window import dispatch_limit
from node.runtime import UnknownMicrobatchError
from node.swarm.routing import pick_replica
from node.wire.messages import Backward, ErrorReport, Forward, MessageError, Notice
from node.wire.messages import NoticeKind as NK

MEASURE_AFTER = 8  # microbatches before a replica announces its measured throughput

KNOWN_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "UNAVAILABLE",
        "ABORTED",
        "PERMISSION_DENIED",
        "INTERNAL",
        "DATA_LOSS",
    }
)


class DataFlow:
    def __init__(self, core: Core):
        self.c = core
        # set by the machine (they call each other): recovery.Recovery, adoption.Adopter
        self.recovery = None
        self.adoption = None
        self.disputes = None  # disputes.Disputes

    # ---- stage 0: dispatch its share ---------------------------------------------------
    def pump(self) -> None:
        c, s = self.c, self.c.state
        L = s.ledger
        self.adoption.adopt_left_shares()
        self.adoption.process_adoptions()
        self.disputes.settle()
        self.recovery.retry_orphans()
        if L.stalled and self.route() is not None:  # a downstream replica is back
            stalled, L.stalled = L.stalled, []
            for i in stalled:
                self.send_forward(i, L.z_out[i])
        if not c.is_first or not s.synced or self.recovery.hold_dispatch():
            return
        limit = dispatch_limit(self.c)
        # a dead replica's microbatches that downstream holds are its adoption's to redo
        # (we split the step without it when we missed a round: found by the harness)
        claimed = self.adoption.claimed()
        held = self.adoption.holds_dispatch()
        while not held and self._room(limit) and self.route() is not None:
            i = next((i for i in L.queue if i not in claimed), None)
            if i is None:
                break
            L.queue.remove(i)
            mb = c.batches.microbatch(s.step, i)
            z = c.compute(c.runtime.forward, mb)
            self.send_forward(i, Forward(mb.id, z, mb.offsets, mb.fingerprint))
            c.trace("forward")
        self.pump_ahead(limit)

    def pump_ahead(self, limit: int | None = None) -> None:
        """Stage 0, overlapped: dispatch the next step's early microbatches the window has room
        for; also while the step's averaging round runs (machine.py)."""
        c, s = self.c, self.c.state
        if not c.is_first or not s.synced or self.recovery.hold_dispatch():
            return
        if limit is None:
            limit = dispatch_limit(self.c)
        A = self.ahead_share()
        while A is not None and A.queue and self._room(limit) and self.route():
            i = A.queue.pop(0)
            mb = c.batches.microbatch(A.step, i)
            z = c.compute(c.runtime.forward, mb)
            self.send_forward(i, Forward(mb.id, z, mb.offsets, mb.fingerprint), A)
            A.begun_early += 1
            c.trace("forward")

    def _room(self, limit: int) -> bool:
        """May stage 0 dispatch one more now: the window has room and the turn its compute (one
        forward a turn, sent before the next is computed: Core.turn_over)?"""
        return len(self.c.runtime.pending) < limit and not self.c.turn_over()

    # ---- overlapped: the next step's first microbatches, begun in this one -----------------
    def begins_ahead(self, mid: MicrobatchId) -> bool:
        """May this stage take microbatch `mid` of the next step while still in its own? The
        schedule's overlap says which (none for 1f1b); never past --steps, never while
        draining (the run, or this node, ends with this step) or unsynced."""
        c, s = self.c, self.c.state
        return (
            mid.step == s.step + 1
            and 0 <= mid.index < c.runtime.overlap  # this stage's (runtime.stage_overlap)
            and mid.step < c.cfg.steps
            and s.synced
            and not s.draining
        )

    def ahead_share(self) -> StepLedger | None:
        """Stage 0, its share of this step dispatched: the next step's ledger, with its first
        microbatches of the same share queued (opened once; None while it may not begin)."""
        c, s = self.c, self.c.state
        if s.ledger.queue or not self.begins_ahead(MicrobatchId(s.step + 1, 0)):
            return None
        if s.ahead is None:
            s.ahead = StepLedger(s.step + 1)
            ids = [i for i in s.ledger.share if i < c.schedule.overlap]
            s.ahead.share, s.ahead.queue = ids, list(ids)
        return s.ahead

    def takes_ahead(self, peer: str, side: str, msg) -> bool:
        """Is this message of the next step one to handle now rather than hold (overlapped)?
        A gradient only if it answers a forward of ours: one for a dead replica's forward is
        its adoption's, which the replays held for that step open (found by the harness:
        refused now, it was lost)."""
        s = self.c.state
        if isinstance(msg, Forward):
            return side == "up" and not msg.replay_of and self.begins_ahead(msg.id)
        if isinstance(msg, Backward):
            A = s.ahead
            return (
                not msg.replay_of
                and A is not None
                and msg.id.step == A.step
                and A.sent_to.get(msg.id.index) == peer
            )
        return False

    def route(self) -> str | None:
        c, s = self.c, self.c.state
        load = s.ledger.outstanding()
        # one that refused a forward as UNAVAILABLE (syncing, leaving): not until the DHT could
        # say so (its record is then joining or draining, and not routable anyway)
        horizon = 2 * c.cfg.refresh_s
        refused = {p for p, t in s.ledger.unavailable.items() if c.now - t < horizon}
        routable = {
            p: load.get(p, 0) for p in s.live("down") if c.view.routable(p) and p not in refused
        }
        staying = {p: n for p, n in routable.items() if p not in s.leaving}
        # a draining replica finishes the step it is in: when it is the only one left (the
        # whole swarm stops at once), this step's work still goes to it
        in_step = set(s.ledger.sent_to.values())
        candidates = staying or {p: n for p, n in routable.items() if p in in_step}
        return pick_replica(candidates, c.view.throughputs())

    def send_forward(self, i: int, fwd: Forward, L: StepLedger | None = None) -> None:
        L = L or self.c.state.ledger
        L.z_out[i] = fwd
        dst = self.route()
        if dst is None:
            L.stalled.append(i)
            return
        L.sent_to[i] = dst
        if self.c.is_first and fwd.grad_needed:
            self.c.state.window.on_sent(fwd.id, self.c.now)
        self.c.send(dst, fwd)

    # ---- dispatch ------------------------------------------------------------------------
    def on_message(self, peer: str, side: str, msg) -> None:
        if isinstance(msg, Forward):
            if msg.replay_of:
                self.adoption.on_replay_forward(peer, side, msg)
            else:
                self.on_forward(peer, side, msg)
        elif isinstance(msg, Backward):
            if msg.replay_of:
                self.adoption.on_replay_backward(peer, side, msg)
            else:
                self.on_backward(peer, side, msg)
        elif isinstance(msg, Notice):
            self.on_notice(peer, side, msg)
        elif isinstance(msg, ErrorReport):
            code = msg.code if msg.code in KNOWN_CODES else "other"  # a peer's string: bounded
            self.c.state.errors["peer_" + code] += 1
            log.warning("stage %d: %s reports %s: %s", self.c.k, peer, code, msg.message[:300])
            if code in ("UNAVAILABLE", "FAILED_PRECONDITION"):
                self.on_unavailable(peer, side, msg)
            elif code == "ABORTED":
                self.disputes.on_taken(peer, side, msg)

    def on_unavailable(self, peer: str, side: str, msg: ErrorReport) -> None:
        """A downstream replica could not take our forward (it is syncing its weights, or
        leaving; or it lags steps behind its siblings, which did the work, and refused a step
        that far ahead as FAILED_PRECONDITION) and holds nothing of it: send it to another
        replica (found by the harness: the microbatch waited for a gradient that would never
        come). The one that refused gets no forward until the DHT could say why."""
        mid = msg.id
        if side != "down" or not isinstance(mid, MicrobatchId) or not isinstance(mid.step, int):
            return
        L = self.c.state.ledger_of(mid.step)  # this step's, or the next one's (overlapped)
        if L is None:
            return
        i = mid.index
        if L.sent_to.get(i) != peer or i in L.grad_out or i not in L.z_out or i in L.replayed:
            return  # not ours to re-send (a peer's claim is checked against our own ledger;
            # a replay belongs to its adoption, which a plain forward would bypass)
        rec = self.c.view.stage(self.c.k + 1).get(peer)
        if msg.code == "FAILED_PRECONDITION" and rec is not None and rec.step > mid.step:
            return  # it is past that step: the stage's round covered the id without ours
        # route() reads this step's ledger: a refusal of the next step's forward counts there
        self.c.state.ledger.unavailable[peer] = L.unavailable[peer] = self.c.now
        del L.sent_to[i]
        self.send_forward(i, L.z_out[i], L)

    def on_notice(self, peer: str, side: str, msg: Notice) -> None:
        s = self.c.state
        if msg.kind == NK.leaving:
            s.leaving.add(peer)
            log.info("stage %d: %s is leaving", self.c.k, peer)
        elif msg.kind == NK.replay_end:
            self.adoption.on_replay_end(peer, side, msg)
        elif msg.kind in (NK.step_done, NK.forwarded):
            if side != "up" or msg.step != s.step:
                return
            if any(not 0 <= i < self.c.M for i in msg.ids):
                s.errors["INVALID_ARGUMENT"] += 1
                return
            told = s.ledger.done_from if msg.kind == NK.step_done else s.ledger.fwd_from
            told[peer] = set(msg.ids)

    # ---- forward -------------------------------------------------------------------------
    def check_forward(self, peer: str, side: str, msg: Forward) -> tuple[str, str] | None:
        c, s, mid = self.c, self.c.state, msg.id
        if c.is_first or side != "up":
            return ("INVALID_ARGUMENT", "forward messages must come from the upstream stage")
        if msg.z is None:
            return ("INVALID_ARGUMENT", "forward without a boundary tensor")
        if mid.step != s.step and not self.begins_ahead(mid):
            return ("FAILED_PRECONDITION", f"this stage is at step {s.step}")
        if not 0 <= mid.index < c.M:
            return ("INVALID_ARGUMENT", f"microbatch index outside 0..{c.M - 1}")
        if not s.synced:
            return ("UNAVAILABLE", "this replica is still syncing its weights")
        L = s.ledger_of(mid.step)
        if L is not None and mid.index in L.z_in:
            first = L.came_from.get(mid.index)
            if msg.grad_needed and first not in (None, peer) and first not in s.dead:
                # two replicas of stage 0 both hold the id as theirs: disputes.py
                return ("ABORTED", "another upstream replica forwarded this microbatch first")
            return ("ALREADY_EXISTS", "this microbatch was already forwarded")
        try:
            c.batches.check(Microbatch(mid, msg.offsets, msg.data_fingerprint))
        except DataMismatchError as err:
            return ("FAILED_PRECONDITION", str(err))
        except ValueError as err:
            return ("INVALID_ARGUMENT", str(err))
        return None

    def on_forward(self, peer: str, side: str, msg: Forward) -> None:
        c = self.c
        problem = self.check_forward(peer, side, msg)
        if problem is not None:
            c.refuse(peer, MessageError(msg.id, *problem))
            return
        s = c.state
        if msg.id.step == s.step and self.adoption.late_forward(peer, msg):
            return
        redone = not msg.grad_needed  # a finished step's z, computed again (protocol/redo.py)
        if redone:
            if not self.adoption.past.takes_redone(msg):
                c.refuse(peer, MessageError(msg.id, "NOT_FOUND", "no adoption here takes it"))
            elif self.adoption.adoptions_open():  # its claim may not be in yet: held for it
                s.redone_in.setdefault(msg.id.index, (peer, msg))
            else:
                self.run_forward(peer, msg, redone=True)
            return
        self.run_forward(peer, msg)

    def run_forward(self, peer: str, msg: Forward, redone: bool = False) -> None:
        """A forward taken: this step's (or the next one's, begun early), run and sent on."""
        c, s = self.c, self.c.state
        if msg.id.step != s.step and s.ahead is None:
            s.ahead = StepLedger(msg.id.step)
        i, L = msg.id.index, s.ledger_of(msg.id.step)
        L.came_from[i], L.z_in[i] = peer, msg
        if redone:
            L.no_grad_back.add(i)  # its sender applied that step: it wants no gradient
        L.begun_early += L is not s.ledger
        mb = Microbatch(msg.id, msg.offsets, msg.data_fingerprint)
        if c.is_last:
            self.last_stage(i, mb, msg.z, L)
        else:
            z = c.compute(c.runtime.forward, mb, msg.z)
            self.send_forward(i, Forward(msg.id, z, msg.offsets, msg.data_fingerprint), L)
        c.trace("forward")

    def last_stage(self, i: int, mb: Microbatch, z, L: StepLedger | None = None) -> None:
        c = self.c
        L = L or c.state.ledger
        result = c.compute(c.runtime.forward_backward, mb, z)
        self.count(i, result.loss, L)
        L.grad_in[i] = result.grad_input
        self.grad_upstream(i, L)

    def count(self, i: int, loss: float | None = None, L: StepLedger | None = None) -> None:
        s = self.c.state
        L = L or s.ledger
        L.counted.add(i)
        if loss is not None:
            L.loss_sum += loss
        s.stats["counted"] += 1
        # measured throughput: a moving average of compute seconds per microbatch, announced
        # only after a few samples (the first ones are slow: a replica would look slow, get no
        # work and never be measured again); until then routing treats it as an average one
        dt, s.compute_mark = s.compute_s - s.compute_mark, s.compute_s
        if dt > 0:
            s.s_per_mb = dt if not s.s_per_mb else 0.8 * s.s_per_mb + 0.2 * dt
        if s.stats["counted"] >= MEASURE_AFTER and s.s_per_mb:
            s.mb_per_s = 1.0 / s.s_per_mb

    def grad_upstream(self, i: int, L: StepLedger | None = None) -> None:
        """Send our dL/dz to whoever sent us microbatch i (unless it already has it)."""
        c = self.c
        L = L or c.state.ledger
        if c.is_first or i in L.no_grad_back:
            return
        up = L.came_from.get(i, "")
        if c.state.live("up").get(up) is not None:
            c.send(up, Backward(MicrobatchId(L.step, i), L.grad_in[i]))
        # else: that replica died; our report to its adopter carries this gradient

    # ---- backward ------------------------------------------------------------------------
    def on_backward(self, peer: str, side: str, msg: Backward) -> None:
        c, s = self.c, self.c.state
        mid = msg.id
        i = mid.index
        L = s.ledger_of(mid.step) if isinstance(mid.step, int) else None
        if self.adoption.past.on_backward(peer, msg):
            return  # the gradient of a forward redone in an applied step (protocol/redo.py)
        if c.is_last or side != "down":
            problem = ("INVALID_ARGUMENT", "backward messages must come from the downstream stage")
        elif (
            msg.grad is not None
            and mid.step in (s.step, s.step + 1)  # the next step's: a dead stage-0 replica's
            and self.adoption.late_claim(peer, msg)  # early one, adopted once we get there
        ):
            return
        elif (
            L is None
            or L.sent_to.get(i) != peer
            or i in L.grad_out
            or mid not in c.runtime.pending
            or msg.grad is None
        ):
            problem = ("NOT_FOUND", f"no forward of this microbatch is pending on stage {c.k}")
        else:
            problem = None
        if problem is not None:
            c.refuse(peer, MessageError(mid, *problem))
            return
        try:
            grad_in = c.compute(c.runtime.backward, mid, msg.grad)
        except (UnknownMicrobatchError, ValueError) as err:
            c.refuse(peer, MessageError(mid, "INVALID_ARGUMENT", str(err)))
            return
        L.grad_out[i] = msg.grad
        if c.is_first:
            s.window.on_gradient(mid, c.now)
        self.count(i, None, L)
        if grad_in is not None:
            L.grad_in[i] = grad_in
            self.grad_upstream(i, L)
        c.trace("backward")

    # ---- STEP_DONE and FORWARDED ---------------------------------------------------------
    def note_done(self) -> None:
        """What this replica tells its downstream replicas about the step, once it knows it
        gets no more of the step's microbatches (stage 0: its share is dispatched; a later
        stage: its upstream replicas' notices name every id):

        - FORWARDED, the ids it passed on, once it has passed on all it got: a downstream
          replica then knows it gets no more either (the notice follows the forwards on the
          same ordered stream), before any backward is back;
        - STEP_DONE, the ids whose gradients it holds, once it has run the backward of all
          it got. A downstream replica applies its update only when its upstream replicas'
          STEP_DONEs name every id: what its stage sent upstream has arrived, so its death
          after the update loses nothing of it (a draining one also stays until upstream has
          applied the step: leaving.owed_upstream).

        A stage's update then waits for the stage before it to hold the step's gradients, about
        one round trip after its last backward, not for stage 0's last gradient and a notice a
        stage after it (STEP_DONE once said "complete up to here" and came down from stage 0:
        #11's overlapped schedule lost most of the round trip it hides). A notice sent too early
        (a forward re-sent elsewhere after it) names only what is true; each is told again when
        its set grows."""
        c, s = self.c, self.c.state
        L, M = s.ledger, set(range(self.c.M))
        if c.is_last or not s.synced or L.stalled or self.adoption.adoptions_open():
            return
        if L.queue if c.is_first else L.upstream_forwarded() != M:
            return
        forwarded = set(L.sent_to) | L.counted
        if not set(L.came_from) <= forwarded:
            return  # a forward not run yet (a recomputation)
        if forwarded != L.fwd_sent:
            L.fwd_sent, L.fwd_told = forwarded, set()
        if any(mid.step <= s.step for mid in c.runtime.pending):
            return
        if not (set(L.share) if c.is_first else set(L.came_from)) <= L.counted:
            return
        if L.counted != L.done_sent:
            L.done_sent, L.done_told = set(L.counted), set()

    def tell_owed_done(self) -> None:
        """FORWARDED and STEP_DONE of this and the previous steps to every downstream replica
        that has not heard them: one linked since, or relinked after a cut that may have lost
        them."""
        s = self.c.state
        if self.c.is_last:
            return
        for L in s.kept():
            for kind, ids, told in (
                (NK.forwarded, L.fwd_sent, L.fwd_told),
                (NK.step_done, L.done_sent, L.done_told),
            ):
                if not ids:
                    continue
                for peer in s.live("down"):
                    if peer not in told:
                        told.add(peer)
                        self.c.send(peer, Notice(kind, L.step, tuple(sorted(ids)), s.node_id))
