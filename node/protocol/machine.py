"""StageMachine: a stage node's decisions, as `handle(events, now) -> effects`.

One dispatcher over three handler objects that share one StageState (core.py): the data path
(flow.py), recovery of a dead neighbour's work (recovery.py: its neighbours; adoption.py: the
replica that redoes it), leaving (leaving.py) and the step's end (stepend.py).
Once the events it was given are handled it advances the schedule as far as it can: leave if
draining and idle, dispatch stage 0's share, and end the step when the schedule says the stage's
part is done. A call (a turn) runs at most one microbatch's compute, so that what it sends
leaves before the next is computed (Core.turn_over); events it has no budget left for wait in
its backlog, and the driver calls again at once (`more`). While an Average or Resync effect
waits for its answer, messages and link changes are kept (in order) and handled after it, as a
node that is busy averaging reads nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

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
from node.protocol.position import Position
from node.protocol.recovery import Recovery
from node.protocol.schedule import make_schedule
from node.protocol.state import LinkInfo, StageState
from node.protocol.stepend import StepEnd
from node.protocol.syncing import StateSync
from node.protocol.view import SwarmView
from node.wire.messages import Backward, ErrorReport, Forward, MessageError, Notice, step_of
from node.wire.messages import NoticeKind as NK

UPSTREAM_APPLIED = "(the stage before applied the step)"  # a done_from key, not a node


class StageMachine:
    def __init__(
        self, cfg, runtime, batches, state: StageState, view: SwarmView, averaging: bool,
        clock: Callable[[], float] | None = None,
    ):  # fmt: skip
        self.core = c = Core(
            cfg, cfg.stage, cfg.model.n_stages, runtime, batches, state, view,
            make_schedule(cfg.schedule, cfg.overlap_mbs),
        )  # fmt: skip
        if clock is not None:
            c.clock = clock
        self.position = Position(c)
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
        state.keep = self.position.reach()  # finished ledgers kept: as far back as a
        # neighbour may be; and the last finished step's weights, from which a sibling's part
        # of it is redone (redo.PastRedo): only where replicas can take over a dead one's work
        runtime.keep_past = view.dynamic
        self._deferred: list = []
        self._backlog: deque = deque()  # events a turn had no budget left for (handle)

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
        """Handle `events` (one, or a batch that arrived together) in order, then advance; one
        turn runs at most one microbatch's compute (Core.turn_over), and what is left waits in
        the backlog for the next call (`more`: the driver calls again at once, with whatever
        arrived meanwhile appended)."""
        c = self.core
        c.now, c.effects, c.computes = now, [], 0
        if self.exit is not None:
            self._backlog.clear()
            return []
        # after a failed round, the next attempt waits for new events: what arrived meanwhile
        # (a neighbour's replays, say) may be what the round lacked (a turn that only works
        # through the backlog brings none)
        if events:
            self.state.round_backoff = False
        queue = self._backlog
        queue.extend(events if isinstance(events, list) else [events])
        if begin:
            queue.extendleft(reversed(self.state.enter_step(self.state.step)))
        try:
            while True:
                while queue and not c.turn_over():
                    due = self._one(queue.popleft())
                    if due:  # a new step's early messages, ahead of anything newer
                        queue.extendleft(reversed(due))
                if queue:
                    break  # the turn ran its microbatch: the rest next turn
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
        if self.exit is not None:
            queue.clear()
        return c.effects

    @property
    def backlogged(self) -> bool:
        """Events wait for a turn: the driver hands over no more until they are handled (what
        arrives goes behind them anyway), so that the inbox's bounds (limits.max_inbox_mb, a
        link read no further while it has a message waiting) still hold what a node takes in."""
        return self.exit is None and bool(self._backlog)

    @property
    def more(self) -> bool:
        """Is there work for another turn without new input: events kept back, or a turn that
        ended on its compute budget (stage 0 may have more of its window to dispatch)?"""
        return self.exit is None and (bool(self._backlog) or self.core.turn_over())

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
                far = self.position.reach() + tells
                if s.step < step <= s.step + far and self._room_for(ev):
                    s.hold_early(ev)  # a neighbour is one step ahead: normal
                    return None
                # only data says we are behind: a REPLAY_END may name a step ahead of ours
                # (for an adopter that may be ahead), found by the harness
                data = isinstance(msg, (Forward, Backward))
                if step > s.step + self.position.reach() and c.view.dynamic and data:
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
        if self.position.behind():
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

    def refuses_step(self, peer: str, side: str, step: int) -> str | None:
        """Why a neighbour's data of `step` would be refused unseen (Position.refuses; the link
        asks before decoding it)."""
        return self.position.refuses(peer, side, step)

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
        if self.more:
            return 0.0
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
