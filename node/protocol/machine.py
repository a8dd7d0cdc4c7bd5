"""StageMachine: a stage node's decisions, as `handle(events, now) -> effects`.

One dispatcher over three handler objects that share one StageState (core.py): the data path
(flow.py), recovery of a dead neighbour's work (recovery.py: its neighbours; adoption.py: the
replica that redoes it), leaving (leaving.py) and the step's end (stepend.py).
After each batch of events it advances the schedule as far as it can: leave if draining and
idle, dispatch stage 0's share, and end the step when the schedule says the stage's part is
done. While an Average or Resync effect waits for its answer, messages and link changes are kept
(in order) and handled after it, as a node that is busy averaging reads nothing.
"""

from __future__ import annotations

from collections import deque

from node.errors import NodeFailed
from node.protocol.adoption import Adopter
from node.protocol.core import Core, log
from node.protocol.disputes import Disputes
from node.protocol.events import (
    Exit,
    LinkDown,
    LinkUp,
    Received,
    RoundDone,
    StateLoaded,
    Stop,
    Tick,
    View,
)
from node.protocol.flow import DataFlow
from node.protocol.leaving import Leaving
from node.protocol.recovery import Recovery
from node.protocol.schedule import make_schedule
from node.protocol.state import LinkInfo, StageState
from node.protocol.stepend import StepEnd
from node.protocol.syncing import StateSync
from node.protocol.view import SwarmView
from node.wire.messages import Backward, ErrorReport, Forward, MessageError, Notice, step_of
from node.wire.messages import NoticeKind as NK

UPSTREAM_APPLIED = "(the stage before applied the step)"  # a done_from key, not a node
BEHIND_IDLE_S = 5.0  # one step behind, idle, next-step work waiting: this long, then resync


class StageMachine:
    def __init__(self, cfg, runtime, batches, state: StageState, view: SwarmView, averaging: bool):
        self.core = c = Core(
            cfg, cfg.stage, cfg.model.n_stages, runtime, batches, state, view,
            make_schedule(cfg.schedule, cfg.overlap_mbs),
        )  # fmt: skip
        self.flow = DataFlow(c)
        self.recovery = Recovery(c, self.flow)
        self.adoption = Adopter(c, self.flow)
        self.flow.recovery, self.flow.adoption = self.recovery, self.adoption
        self.flow.disputes = Disputes(c, self.adoption)
        self.sync = StateSync(c, averaging)
        self.stepend = StepEnd(c, averaging, self.sync)
        self.leaving = Leaving(c, self.flow, self.recovery)
        self.started = False
        self.exit: Exit | None = None
        state.keep = self._reach()  # finished ledgers kept: as far back as a neighbour may be
        # and the last finished step's weights, from which a sibling's part of it is redone
        # (redo.PastRedo): only where replicas can take over a dead one's work
        runtime.keep_past = view.dynamic
        self._deferred: list = []

    @property
    def state(self) -> StageState:
        return self.core.state

    @property
    def view(self) -> SwarmView:
        return self.core.view

    # ---- the one entry point -------------------------------------------------------------
    def start(self, now: float) -> list:
        """The node is placed (synced, or joining with nothing): begin its step."""
        self.started = True
        with self.core.lock:  # a joiner's download may read the state meanwhile
            self.sync.vouch()
        return self.handle([], now, begin=True)

    def handle(self, events, now: float, begin: bool = False) -> list:
        """Handle `events` (one, or a batch that arrived together), then advance."""
        c = self.core
        c.now, c.effects = now, []
        if self.exit is not None:
            return []
        # after a failed round, the next attempt waits for this call's events: what arrived
        # meanwhile (a neighbour's replays, say) may be what the round lacked
        self.state.round_backoff = False
        queue = deque(events if isinstance(events, list) else [events])
        if begin:
            queue.extendleft(reversed(self.state.enter_step(self.state.step)))
        try:
            while True:
                while queue:
                    due = self._one(queue.popleft())
                    if due:  # a new step's early messages, ahead of anything newer
                        queue.extendleft(reversed(due))
                if self.started and not self.state.waiting_for:
                    due = self._advance()
                    if due:
                        queue.extend(due)
                        continue
                elif self.started and self.state.waiting_for == "round":
                    self.flow.pump_ahead()  # overlapped: the round does not stop the pipeline
                break
        except NodeFailed as err:
            self._exit(1, str(err))
        return c.effects

    def _one(self, ev) -> list | None:
        """Handle one event; returns events it made due (the early ones of a new step)."""
        s = self.state
        if isinstance(ev, View):
            self.core.view = self.core.view.updated(ev.records)
            s.view_at, s.views = self.core.now, s.views + 1
            s.saw_replicas(ev.records.get(self.core.k, {}))
            s.prune_peers()
            return None
        if isinstance(ev, Stop):
            self.request_stop()
            return None
        if isinstance(ev, RoundDone):
            if s.waiting_for != "round":
                return None
            due = self.stepend.on_round(ev.result, ev.seconds)
            return self._undefer(due)
        if isinstance(ev, StateLoaded):
            if s.waiting_for != "resync":
                return None
            due = self.sync.on_state(ev.meta, ev.tensors)
            return self._undefer(due)
        if s.waiting_for:
            if self._ahead_in_round(ev):
                return self._received(ev)
            if not isinstance(ev, Tick):
                self._deferred.append(ev)
            return None
        if isinstance(ev, LinkUp):
            old = s.links.get(ev.peer)
            since = old.since if old else self.core.now
            s.links[ev.peer] = LinkInfo(ev.side, ev.serial, since=since)
        elif isinstance(ev, LinkDown):
            info = s.links.get(ev.peer)
            if info is not None and info.serial == ev.serial:
                info.up = False
            self.recovery.on_link_down(ev.peer, ev.side, ev.reason, self._started())
        elif isinstance(ev, Received):
            return self._received(ev)
        return None

    def _ahead_in_round(self, ev) -> bool:
        """Overlapped: while the step's averaging round runs, the next step's early microbatches
        go on (their weights do not depend on the round: StageRuntime.open_early), so the round
        is hidden as the drain is. Only while nothing else waits for the round's end: what a
        neighbour sent is handled in the order it came (a LinkUp kept back, then its peer's
        forward handled, would send the gradient nowhere)."""
        s = self.state
        return (
            s.waiting_for == "round"
            and not self._deferred
            and isinstance(ev, Received)
            and isinstance(ev.msg, (Forward, Backward))
            and step_of(ev.msg) == s.step + 1
            and self.flow.takes_ahead(ev.peer, ev.side, ev.msg)
        )

    def _undefer(self, due: list | None) -> list:
        if self.state.waiting_for:  # asked again (a resync after a round, a retry)
            return list(due or [])
        deferred, self._deferred = self._deferred, []
        return list(due or []) + deferred

    def _received(self, ev: Received) -> list | None:
        """A peer's message never takes the node down: a failure handling one (a bug, or an
        input no check foresaw) is logged, counted and refused; only our own failures stop us."""
        c, s, msg = self.core, self.state, ev.msg
        if (s.drained or s.step >= c.cfg.steps) and isinstance(msg, (Forward, Backward)):
            if c.view.dynamic:  # the sender re-routes it (a fixed pipeline has nowhere to)
                why = "this replica is leaving (its part of the run is done)"
                c.refuse(ev.peer, MessageError(msg.id, "UNAVAILABLE", why))
            return None
        try:
            step = step_of(msg)
            self._align_resumed(ev, step)
            buffered = not (isinstance(msg, Notice) and msg.kind == NK.leaving)
            if buffered and step is not None and not isinstance(msg, ErrorReport):
                if step == s.step + 1 and self.flow.takes_ahead(ev.peer, ev.side, msg):
                    self.flow.on_message(ev.peer, ev.side, msg)  # overlapped: begun early
                    return None
                # a STEP_DONE may come one step further: upstream sends it as it dispatches,
                # and a replica of ours that got no work may still wait for its last round
                # (found by the harness: dropped, the replica waited for it forever)
                tells = isinstance(msg, Notice) and msg.kind in (NK.step_done, NK.forwarded)
                far = self._reach() + tells
                if s.step < step <= s.step + far and self._room_for(ev):
                    s.hold_early(ev)  # a neighbour is one step ahead: normal
                    return None
                # only data says we are behind: a REPLAY_END may name a step ahead of ours
                # (for an adopter that may be ahead), found by the harness
                data = isinstance(msg, (Forward, Backward))
                if step > s.step + self._reach() and c.view.dynamic and data:
                    if (why := self.refuses_step(ev.peer, ev.side, step)) is not None:
                        c.refuse(ev.peer, MessageError(msg.id, "FAILED_PRECONDITION", why))
                        return None
                    log.warning("stage %d: got step %d at step %d: resyncing", c.k, step, s.step)
                    if self._room_for(ev):  # ours once we hold that step (found by
                        s.hold_early(ev)  # the harness: it was dropped, and lost)
                    self.sync.resync()  # we are behind the swarm
                    return None
            self.flow.on_message(ev.peer, ev.side, msg)
        except NodeFailed:
            raise
        except Exception as err:
            s.errors["internal"] += 1
            log.exception("stage %d: failed to handle %s from %s", c.k, type(msg).__name__, ev.peer)
            why = f"could not handle it: {type(err).__name__}"
            c.send(ev.peer, ErrorReport(getattr(msg, "id", None), "INTERNAL", why))
        return None

    def _reach(self) -> int:
        """How many steps ahead of ours a neighbour's data may be when it is normal. One for
        1f1b. Overlapped: our STEP_DONEs may wait unhandled in the batch of events that carries
        what a neighbour sent after them, and it may have gone on meanwhile: stage 0 begins step
        t+2 once step t's gradients are back (two), and with the whole step begun early
        (overlap = M) it may finish t+1 at once, and begin t+3 (three; found by a review, with
        batches of messages as the daemon delivers them). Such data is held until we are there.
        """
        D = self.core.schedule.overlap
        return 1 + (D > 0) + (D >= self.core.M)

    def _room_for(self, ev: Received) -> bool:
        """May a message of a step ahead wait in the early buffer? Bounded in count (an honest
        neighbour sends a few per microbatch) and, with adoptions, in bytes (limits.max_held_mb);
        past either, it is handled now, as a message of a step we do not hold."""
        c = self.core
        return self.state.early_room(ev.msg, 8 * c.M + 64, c.held_budget)

    # ---- advancing -----------------------------------------------------------------------
    def _advance(self) -> list | None:
        """The schedule's next moves; returns early events due when the step advanced."""
        c, s = self.core, self.state
        if s.step >= c.cfg.steps or s.drained:
            if not self.leaving.lingering():
                self._exit(0, "drained" if s.drained else "finished")
            return None
        if self._behind():
            # their update covered our part (a valid round has every id); not the next step's
            # work we took early (overlapped): we load that step's state and finish it there
            if s.draining and not s.holds_ahead():
                if not s.drained:
                    log.info("stage %d: the stage's replicas moved on: leaving", c.k)
                s.drained = True  # and gone, unless upstream may still need our gradients
                if not (self.leaving.owed_upstream() and self.leaving.lingering()):
                    self._exit(0, "drained")
                return None
            log.warning("stage %d: the stage's replicas moved on without us: resyncing", c.k)
            self.sync.resync()
            return None
        if s.draining and (why := self.leaving.check_drain()) is not None:
            self._exit(0, why)
            return None
        if s.drained:  # nothing of this step was ours: linger (for a suspect), then leave
            return self._advance()
        if self.leaving.run_over(self._started()):
            self._exit(0, "a neighbour stage left")
            return None
        self.flow.pump()
        if not self._complete() or s.round_backoff:
            return None
        due = self.stepend.finish()
        if due is None:
            return None
        return [*due, Tick()]  # a Tick, so that the loop advances again even with nothing due

    def _complete(self) -> bool:
        """This replica's part of the step is done and the whole stage's is too, as far as it
        can tell; the averaging round checks the rest."""
        c, s = self.core, self.state
        L = s.ledger
        self.flow.note_done()  # FORWARDED and STEP_DONE: what downstream's update waits for
        self.flow.tell_owed_done()  # even mid-step: a neighbour that (re)linked may wait for it
        busy = any(mid.step <= s.step for mid in c.runtime.pending)  # not the next step's
        if busy or self.adoption.adoptions_open() or L.stalled:
            return False
        if not s.synced:
            return c.view.dynamic  # an unsynced replica joins the round with nothing
        if not c.is_first and c.view.dynamic:
            # the stage before applied this step (its replicas' records agree they are past
            # it): its round covered every id, so it holds every gradient we sent it, whoever
            # of it died since. A dead replica's STEP_DONE is dropped at its death, and its
            # adopter, done with the step, never says it again (overlapped seed 792 under load)
            agreed = c.view.agreed_step(c.k - 1, s.node_id, s.dead)
            if agreed is not None and agreed > s.step:
                L.done_from.setdefault(UPSTREAM_APPLIED, set(range(c.M)))
        return c.schedule.part_done(s)

    def _started(self) -> bool:
        return self.state.started() or bool(self.core.runtime.pending)

    def _behind(self) -> bool:
        """Our weights are stale and we must resync: our stage's replicas agree they are two
        or more steps ahead (two vouch for one state there, or the only other one does:
        view.agreed_step; they applied updates without us: we missed their rounds), or one is
        ahead while either our averaging rounds fail (a round that completed for the others but
        not for us: a round is not atomic) or we hold none of our step's work
        and upstream already sends the next step's (a replica that applied the step alone
        while we were joining). Being one step behind is normal for a moment at every step's
        end, so it counts only once it has lasted BEHIND_IDLE_S."""
        c, s = self.core, self.state
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

    def refuses_step(self, peer: str, side: str, step: int) -> str | None:
        """Why a neighbour's data of `step` would be refused unseen (the link then refuses it
        before decoding it): a far step the DHT does not vouch for. None: let it in."""
        c, s = self.core, self.state
        # only a synced node judges: one not yet placed (a restart resuming from its
        # checkpoint) takes its neighbours' replays of later steps (found by CI: refused, they
        # were lost and the swarm stalled)
        if (
            c.view.dynamic
            and s.synced
            and step > s.step + self._reach()
            and not self._vouched(peer, side, step)
        ):
            return f"this stage is at step {s.step}, and the DHT says no different"
        return None

    def _vouched(self, peer: str, side: str, step: int) -> bool:
        """May a neighbour's data of a far `step` make us resync? Only if the DHT's sealed
        records agree we are behind: our stage's replicas agree they are ahead of us, or the
        sender's stage's replicas agree they are near that step (records lag a refresh;
        view.agreed_step). One stranger's forward of step 10^5 made a node resync at every
        message, and the swarm stopped (#10 H1; resbm bench flood); then its own record of a
        far step did, as one of its stage's replicas (a lone replica's record is its stage's
        word)."""
        c, s = self.core, self.state
        ours = c.view.agreed_step(c.k, s.node_id, s.dead)
        if ours is not None and ours >= s.step + 1:
            return True
        stage = c.k - 1 if side == "up" else c.k + 1
        theirs = c.view.agreed_step(stage, s.node_id, s.dead)
        return theirs is not None and theirs >= step - 1

    def _align_resumed(self, ev: Received, step: int | None) -> None:
        """A fixed pipeline just restarted with --resume: its stages' newest checkpoints can be
        one checkpoint apart (a node killed after its neighbour saved a step and before it
        did). Stage 0 keeps the step count: before doing anything else, a resumed stage takes
        the step of the first forward from upstream. Behind, it skips to it (its updates since
        its checkpoint are lost); ahead, it re-does steps with newer weights. Either way the
        run goes on to --steps with sane losses, as a swarm resumes from a checkpoint."""
        c, s, msg = self.core, self.state, ev.msg
        if (
            c.view.dynamic
            or s.resumed_at is None
            or s.resumed_at != s.step
            or not isinstance(msg, Forward)
            or msg.replay_of
            or step is None
            or step == s.step
            or not 0 <= step < c.cfg.steps
            or ev.side != "up"
            or self._started()
        ):
            return
        log.warning(
            "stage %d: resumed at step %d but stage %d is at step %d: continuing at step %d",
            c.k,
            s.step,
            c.k - 1,
            step,
            step,
        )
        c.emit("aligned", stage=c.k, node=s.node_id, step=step, resumed=s.step)
        s.resumed_at = None
        for ev in s.enter_step(step):  # nothing was due: early messages stay early
            s.hold_early(ev)

    # ---- leaving -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Drain: finish this step's work (with its averaging round), then go; neighbours are
        told at once so they route nothing new here."""
        log.info("stage %d: stop requested: draining", self.core.k)
        self.state.draining = True

    def leaving_effects(self, now: float) -> list:
        """What a clean shutdown tells the neighbours (once)."""
        self.core.now, self.core.effects = now, []
        self.leaving.say_leaving()
        return self.core.effects

    def _exit(self, code: int, reason: str) -> None:
        self.exit = Exit(code, reason)
        self.core.effects.append(self.exit)

    # ---- what the driver and the status line read ----------------------------------------
    def wake_after(self) -> float:
        """How long the driver may wait for input before it sends a Tick."""
        failed = self.state.round_fail_since is not None
        return min(1.0, self.core.cfg.matchmaking_s) if failed else 1.0

    def waiting_for(self) -> str:
        c, s = self.core, self.state
        L = s.ledger
        if not s.synced:
            return "syncing with the stage's replicas"
        if s.step >= c.cfg.steps:
            waiting = self.leaving.unfinished()
            return f"finished; staying until {', '.join(waiting) or 'nobody'} finish too"
        if c.is_first and not s.live("down"):
            return f"paused: no replica of stage {c.k + 1} is linked"
        if not c.is_first and not s.live("up"):
            return f"paused: no replica of stage {c.k - 1} is linked"
        return (
            f"{len(L.counted)} counted here, {len(c.runtime.pending)} pending, "
            f"upstream done {len(L.upstream_done())}/{c.M}"
        )

    def place(
        self,
        synced: bool,
        group0: list | None = None,
        step: int | None = None,
        hold_until: float | None = None,
    ) -> None:
        """Before start: where the node's state came from (node/membership.py's Placement)."""
        s = self.state
        s.synced, s.group0 = synced, group0 or s.group0
        if step is not None:
            s.step, s.hold_until = step, hold_until

    def load_state(self, meta: dict, tensors: list, now: float) -> tuple[bool, list]:
        """Before start: take a replica's downloaded state (initial sync): (usable, effects)."""
        self.core.now, self.core.effects = now, []
        self.state.synced, self.state.waiting_for = False, "resync"
        took = self.sync.on_state(meta, tensors, retry=False) is not None  # caller retries
        self.state.waiting_for = None
        return took, self.core.effects

    def snapshot(self):
        """The stage's state for a joiner (hivemind calls it from its own thread)."""
        return self.sync.snapshot()
