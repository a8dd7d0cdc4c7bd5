"""A deterministic swarm in one process: S stages x R replicas of the real StageMachine, each with
the real StageRuntime on a tiny model, joined by a fake network and a fake averager on a virtual
clock. A seed fixes every delay and every fault, so an interleaving that real processes hit by
chance is replayed exactly (`resbm selftest protocol --seed S --scenarios 1`).

What it fakes, and how faithfully:
- links: FIFO per direction (a gRPC stream), seeded delays, cuts that drop what is in flight and
  tell both ends (LinkDown), relinks under a new serial (a flap);
- the DHT: every machine's record (online, joining, draining; step; throughput), refreshed at
  each Tick; a dead machine's record lingers for record_ttl_s;
- hivemind's averaging: groups per stage that close after a matchmaking window or when every
  live replica came; a member that comes late misses the group; a round can finish for some
  members and not for others; a member that dies mid-round fails it for everyone;
- state downloads: a synced replica's snapshot, checked against the replicas' vouches as
  Membership.download checks it (node/protocol/vouching.py);
- compute time: each Core.compute call (a forward, a backward, the last stage's forward and
  backward, an optimizer step) is timed at COMPUTE_S (Core.clock), so the measured throughput
  that routing and the window read is the same on a loaded machine, and equal for every
  replica (no scenario models a slow one).
"""

from __future__ import annotations

import copy
import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.data import Batches, Corpus
from node.model.config import ModelConfig
from node.model.resbm import ResBM
from node.node_config import NodeConfig
from node.protocol import events as ev
from node.protocol.machine import StageMachine
from node.protocol.state import StageState
from node.protocol.view import SwarmView
from node.protocol.vouching import OK, Vouches, snapshot_digest
from node.runtime import StageRuntime
from node.swarm.averaging import Round
from node.swarm.records import NodeRecord, NodeState, Vouch
from node.version import VERSION
from node.wire.messages import ErrorReport

WINDOW_S = 1.0  # matchmaking window of the fake averager (virtual seconds)
TICK_S = 1.0
# what each Core.compute call is timed at (Core.clock): the real time would make routing and
# the window, which read the measured s/microbatch, depend on how loaded the machine is
COMPUTE_S = 0.002  # about what the tiny model takes on a CPU
TURN_S = 0.002  # virtual seconds between a machine's turns while it has work left (its compute)
LIMIT_S = 900.0  # virtual seconds before a scenario counts as stalled


def tiny_config(stages: int, steps: int, microbatches: int, overlap: int = 0) -> dict:
    """`overlap` > 0: the overlapped schedule, taking that many microbatches early."""
    model = ModelConfig(
        d_model=32, n_heads=2, n_layers=stages, n_stages=stages, seq_len=8, compression=16
    )
    return dict(
        model=model, steps=steps, microbatches=microbatches, batch_size=2, seed=0,
        swarm="harness", wire_codec="fp32", record_ttl_s=5.0, refresh_s=1.0,
        matchmaking_s=WINDOW_S, adopt_wait_s=10.0, round_timeout_s=600.0,
        **({"schedule": "overlapped", "overlap": overlap} if overlap else {}),
    )  # fmt: skip


@functools.cache
def _shared(stages: int, steps: int, microbatches: int, overlap: int = 0):
    """The corpus, the seeded stages and the reference run, once per shape (they are pure)."""
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    base = tiny_config(stages, steps, microbatches, overlap)
    corpus = Corpus.load()
    torch.manual_seed(base["seed"])
    model = ResBM(base["model"])
    ref = ReferenceTrainer(
        TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.model_fields}),
        progress=False,
    )
    for _ in range(steps):
        ref.train_step()
    reference = [
        {n: p.detach().clone() for n, p in rt.stage.named_parameters()} for rt in ref.runtimes
    ]
    # one settings object per stage: building one (pydantic-settings) costs more than a step
    cfgs = [NodeConfig(stage=k, **base) for k in range(stages)]
    return cfgs, corpus, model, reference


@dataclass
class Member:
    name: str
    stage: int
    machine: StageMachine
    alive: bool = True
    died_at: float | None = None
    traces: int = 0
    kill_at_trace: int | None = None
    exited: ev.Exit | None = None
    turn_due: bool = False  # a "more" event is queued (StageMachine.more)


@dataclass
class Group:
    stage: int
    closes: float
    members: dict[str, ev.Average] = field(default_factory=dict)
    failed: bool = False


def _alone_with_a_leader(result: Round, i: int, forge: Callable) -> Round:
    """What a hostile leader shows member i: a group of two, the member and the leader, who
    claims every other member's ids and sends `forge` of their vectors' sum. Each group's ids
    are complete, and there is no majority to outvote the leader."""
    others = [j for j in range(len(result.members)) if j != i]
    leader = {**result.members[others[0]], "node": "n-leader"}
    leader["ids"] = sorted(x for j in others for x in result.members[j]["ids"])
    vector = forge(sum(result.vectors[j] for j in others).clone())
    pair = sorted([(result.members[i]["node"], 0), ("n-leader", 1)])
    infos, vectors = [result.members[i], leader], [result.vectors[i], vector]
    return Round([infos[k] for _, k in pair], [vectors[k] for _, k in pair])


class Swarm:
    """One scenario's swarm. `faults` is a list of (kind, ...) tuples (see scenarios.py)."""

    def __init__(
        self, seed: int, stages: int, replicas: int, steps: int = 3, mbs: int = 4,
        partial_rounds: float = 0.1, overlap: int = 0, batch_s: float = 0.0, window: int = 0,
    ):  # fmt: skip
        self.rng = random.Random(seed)
        self.partial_rounds = partial_rounds  # how often a round fails for one of its members
        self.S, self.R, self.steps, self.M = stages, replicas, steps, mbs
        self.overlap = overlap  # > 0: the overlapped schedule
        # > 0: messages arriving within this window reach a node together, in one `handle`,
        # as the daemon hands over what queued while it computed (0: one message a call)
        self.batch_s = batch_s
        self.inbox: dict[str, list] = {}
        shared = _shared(stages, steps, mbs, overlap)
        self.cfgs, self.corpus, self.model, self.reference = shared
        if window:  # stage 0's window fixed (max_in_flight), not sized at run time (window.py)
            self.cfgs = [cfg.model_copy(update={"max_in_flight": window}) for cfg in self.cfgs]
        self.ttl = self.cfgs[0].record_ttl_s
        self.now, self.seq = 0.0, itertools.count()
        self.queue: list = []
        self.members: dict[str, Member] = {}
        self.serial = itertools.count(1)
        self.links: dict[tuple[str, str], int] = {}  # (up, down) -> serial while up
        self.fifo: dict[tuple[str, str], float] = {}  # last delivery time per direction
        self.groups: dict[int, Group] = {}
        # a hostile round member: (stage, step) -> what it makes of that round's sum, once
        self.corruptions: dict[tuple[int, int], Callable] = {}
        # a hostile group leader: (stage, step) or (stage, step, member) -> what it sends each
        # member in place of the others' vectors, in a group of two it shows that member alone
        # (itself claiming the others' ids), once (_split)
        self.splits: dict[tuple, Callable] = {}
        # a hostile donor: what it makes of the next state downloaded, (meta, tensors), once
        self.poison_state: Callable | None = None
        self.step_events: list[dict] = []
        self.log: list[str] = []
        for k in range(stages):
            for r in range(replicas):
                self._spawn(f"s{k}r{r}", k, synced=not (k == 0 and replicas > 1))
        for m in self.members.values():  # each starts with the DHT as it is at the start
            m.machine.handle([ev.View(self._records(m.stage))], 0.0)
        for up in self._alive(range(stages)):
            for down in self._alive([self.members[up].stage + 1]):
                self._link(up, down, 0.0)
        for name in list(self.members):
            self._at(0.01, "start", name)
            self._at(0.02 + self.rng.random() * TICK_S, "tick", name)

    # ---- building ------------------------------------------------------------------------
    def _spawn(self, name: str, k: int, synced: bool) -> Member:
        cfg = self.cfgs[k]
        batches = Batches(self.corpus, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        runtime = StageRuntime(
            copy.deepcopy(self.model.stage(k)), cfg.optim, batches, cfg.microbatches,
            overlap=cfg.overlap_mbs, predict=cfg.prediction,
        )  # fmt: skip
        state = StageState(name, k == 0, cfg.microbatches, synced=synced)
        if k == 0 and synced:
            state.group0 = [(name, 1.0)]
        view = SwarmView(k, self.S, True, self._records(k))
        m = Member(name, k, StageMachine(
            cfg, runtime, batches, state, view, averaging=True,
            clock=functools.partial(next, itertools.count(0.0, COMPUTE_S)),
        ))  # fmt: skip
        self.members[name] = m
        return m

    def _alive(self, stages) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.alive and m.stage in stages)

    def _records(self, k: int) -> dict[int, dict[str, NodeRecord]]:
        out: dict[int, dict[str, NodeRecord]] = {}
        for s in (k - 1, k, k + 1):
            recs = {}
            for n, m in self.members.items():
                gone = not m.alive and self.now - (m.died_at or 0.0) > self.ttl
                if m.stage != s or gone or m.exited is not None:
                    continue
                st = m.machine.state
                state = NodeState.online if st.synced else NodeState.joining
                if st.draining or st.said_leaving:  # as the daemon announces it
                    state = NodeState.draining
                vouching = st.synced  # as Membership.announce does (a finished node too)
                recs[n] = NodeRecord(
                    peer_id=n, address="127.0.0.1:1", state=state, throughput=st.mb_per_s,
                    load=0, version=VERSION, config_hash="0" * 16, step=st.step,
                    averager="1" if vouching else None,
                    vouches=[Vouch(step=t, digest=d) for t, d in st.vouches] if vouching else [],
                )  # fmt: skip
            out[s] = recs
        return out

    # ---- the clock -----------------------------------------------------------------------
    def _at(self, t: float, kind: str, *args) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), kind, args))

    def run(self) -> None:
        while self.queue:
            t, _, kind, args = heapq.heappop(self.queue)
            self.now = t
            if t > LIMIT_S:
                return
            getattr(self, "_" + kind)(*args)
            if all(m.exited is not None or not m.alive for m in self.members.values()):
                return

    def _start(self, name: str) -> None:
        m = self.members[name]
        if m.alive:
            self._effects(m, m.machine.start(self.now))
            self._next_turn(m)

    def _next_turn(self, m: Member) -> None:
        """A turn that left work (StageMachine.more) is followed by the next at once, as the
        daemon does; what arrives meanwhile joins it."""
        if m.alive and m.exited is None and m.machine.more and not m.turn_due:
            m.turn_due = True
            self._at(self.now + TURN_S, "more", m.name)

    def _more(self, name: str) -> None:
        self.members[name].turn_due = False
        self._deliver(name, [])

    def _tick(self, name: str) -> None:
        m = self.members[name]
        if not m.alive or m.exited is not None:
            return
        self._deliver(name, [ev.View(self._records(m.stage)), ev.Tick()])
        self._at(self.now + TICK_S, "tick", name)

    def _deliver(self, name: str, events: list) -> None:
        events = self.inbox.pop(name, []) + events  # what queued before: first, together
        m = self.members[name]
        if m.alive and m.exited is None:
            effects = m.machine.handle(events, self.now)
            s = m.machine.state
            if s.held_bytes() != s.recount_held():  # the byte budget's counts (#10 H5)
                raise AssertionError(
                    f"{name} counts {s.held_bytes()} bytes held, holds {s.recount_held()}"
                )
            self._effects(m, effects)
            self._next_turn(m)

    # ---- effects -------------------------------------------------------------------------
    def _effects(self, m: Member, effects: list) -> None:
        for e in effects:
            if not m.alive:
                return
            if isinstance(e, ev.Send):
                self._send(m.name, e.peer, e.msg)
            elif isinstance(e, ev.Refuse):
                self._send(m.name, e.peer, ErrorReport(e.error.id, e.error.code, str(e.error)))
            elif isinstance(e, ev.Average):
                self._average(m, e)
            elif isinstance(e, ev.Resync):
                self._resync(m)
            elif isinstance(e, ev.Emit) and e.kind == "step":
                self.step_events.append(dict(e.fields))
            elif isinstance(e, ev.Trace):
                m.traces += 1
                if m.kill_at_trace is not None and m.traces >= m.kill_at_trace:
                    self.kill(m.name, f"at trace {m.traces} ({e.phase}, step {e.step})")
            elif isinstance(e, ev.Exit):
                m.exited = e  # the daemon drains its links, then closes them
                for up, down in [p for p in self.links if m.name in p]:
                    other = down if up == m.name else up
                    t = max(self.now, self.fifo.get((m.name, other), 0.0)) + 0.001
                    self._at(t, "fault", "cut", up, down, None)

    def _pair(self, a: str, b: str) -> tuple[str, str] | None:
        sa, sb = self.members[a].stage, self.members[b].stage
        return (a, b) if sb == sa + 1 else (b, a) if sa == sb + 1 else None

    def _send(self, src: str, dst: str, msg) -> None:
        pair = self._pair(src, dst)
        serial = self.links.get(pair) if pair else None
        if serial is None:
            return  # the link is down: lost, as a cut gRPC stream loses it
        t = max(self.fifo.get((src, dst), 0.0), self.now + self.rng.uniform(0.001, 0.05))
        self.fifo[(src, dst)] = t
        side = "up" if self.members[src].stage < self.members[dst].stage else "down"
        self._at(t, "arrive", src, dst, serial, ev.Received(src, side, msg))

    def _arrive(self, src: str, dst: str, serial: int, event) -> None:
        if self.links.get(self._pair(src, dst)) != serial:  # cut since it was sent
            return
        if not self.batch_s:
            self._deliver(dst, [event])
            return
        if dst not in self.inbox:
            self._at(self.now + self.batch_s, "flush", dst)
        self.inbox.setdefault(dst, []).append(event)

    def _flush(self, name: str) -> None:
        if name in self.inbox:
            self._deliver(name, [])

    # ---- links ---------------------------------------------------------------------------
    def _link(self, up: str, down: str, delay: float) -> None:
        serial = next(self.serial)
        self.links[(up, down)] = serial
        self._at(self.now + delay, "notify", up, ev.LinkUp(down, "down", serial))
        self._at(self.now + delay, "notify", down, ev.LinkUp(up, "up", serial))

    def _notify(self, name: str, event) -> None:
        self._deliver(name, [event])

    def cut(self, up: str, down: str, relink_after: float | None) -> None:
        serial = self.links.pop((up, down), None)
        if serial is None:
            return
        self.log.append(f"{self.now:.3f} cut {up}-{down}")
        for a, b, side in ((up, down, "down"), (down, up, "up")):
            if self.members[a].alive:
                t = self.now + self.rng.uniform(0.001, 0.2)
                self._at(t, "notify", a, ev.LinkDown(b, side, serial, "cut"))
        if relink_after is not None:
            self._at(self.now + relink_after, "relink", up, down)

    def _relink(self, up: str, down: str) -> None:
        live = [self.members[n].alive and self.members[n].exited is None for n in (up, down)]
        if all(live) and (up, down) not in self.links:
            self._link(up, down, 0.0)

    def kill(self, name: str, why: str = "") -> None:
        m = self.members[name]
        if not m.alive:
            return
        self.log.append(f"{self.now:.3f} kill {name} {why}")
        m.alive, m.died_at = False, self.now
        for up, down in [p for p in self.links if name in p]:
            self.cut(up, down, None)
        for g in self.groups.values():
            if name in g.members:
                g.failed = True

    def _join(self, k: int) -> None:
        """A new replica of stage k, as `resbm join` starts one: it downloads a replica's
        state (the daemon's initial sync), links to every neighbour, then starts."""
        if not any(m.exited is None and m.alive for m in self.members.values() if m.stage == k):
            return  # its replicas finished the run (or none is left): nothing to join
        name = f"s{k}r{sum(1 for m in self.members.values() if m.stage == k)}"
        m = self._spawn(name, k, synced=False)
        self.log.append(f"{self.now:.3f} join {name}")
        got = self._download(m)
        if got is not None:  # else the joiner starts with nothing (no replica vouches yet)
            self._effects(m, m.machine.load_state(*got, self.now)[1])
        for other in self._alive([k - 1, k + 1]):
            if self.members[other].exited is None:
                pair = (other, name) if self.members[other].stage < k else (name, other)
                self._link(*pair, 0.0)
        self._at(self.now + 0.01, "start", name)
        self._at(self.now + 0.02 + self.rng.random() * TICK_S, "tick", name)

    def _fault(self, kind: str, *args) -> None:
        if kind == "join":
            self._join(*args)
        elif kind == "cut":
            self.cut(*args)
        elif kind == "stop":
            self._deliver(args[0], [ev.Stop()])
        elif kind == "kill":
            self.kill(args[0], "by time")

    # ---- the fake averager ---------------------------------------------------------------
    def _average(self, m: Member, e: ev.Average) -> None:
        g = self.groups.get(m.stage)
        if g is None or self.now > g.closes:
            g = self.groups[m.stage] = Group(m.stage, self.now + WINDOW_S)
            self._at(g.closes, "close", m.stage, id(g))
        g.members[m.name] = e
        if set(g.members) >= set(self._alive([m.stage])):
            g.closes = self.now
            self._close(m.stage, id(g))

    def _close(self, stage: int, gid: int) -> None:
        g = self.groups.get(stage)
        if g is None or id(g) != gid:
            return
        del self.groups[stage]
        names = sorted(g.members)
        if g.failed:
            result = None
        else:
            vectors = [
                torch.cat([g.members[n].grads, torch.tensor([g.members[n].loss_sum])])
                for n in names
            ]
            corrupt = self.corruptions.pop((stage, g.members[names[0]].info["step"]), None)
            if corrupt is not None:  # what a hostile first member sends everyone
                vectors[0] = corrupt(vectors[0].clone())
            result = Round([g.members[n].info for n in names], vectors)
        split = None if result is None or len(names) < 2 else self._split(stage, g, names)
        unlucky = (
            self.rng.choice(names)
            if len(names) > 1 and self.rng.random() < self.partial_rounds
            else None
        )
        for i, n in enumerate(names):
            answer = None if n == unlucky else result
            if split is not None:
                answer = _alone_with_a_leader(result, i, split)
            self._at(self.now + self.rng.uniform(0.001, 0.1), "answer", n, answer)

    def _split(self, stage: int, g: Group, names: list[str]) -> Callable | None:
        """The split asked for this group's stage and step (`splits`), once: keyed (stage,
        step), or (stage, step, member) for the first group that member is in at that step."""
        step = g.members[names[0]].info["step"]
        mine = [(stage, g.members[n].info["step"], n) for n in names]  # at that member's step
        for key in [(stage, step), *mine]:
            if key in self.splits:
                return self.splits.pop(key)
        return None

    def _answer(self, name: str, result) -> None:
        self._deliver(name, [ev.RoundDone(result, 0.0)])

    def _snapshot(self, donor: str):
        meta, tensors = self.members[donor].machine.snapshot()
        if self.poison_state is not None:
            poison, self.poison_state = self.poison_state, None
            meta, tensors = poison(meta, tensors)
        return meta, tensors

    def _download(self, m: Member):
        """A state as Membership.download takes one: asked of the replicas whose records vouch,
        taken only if they vouch for its digest (vouching.py; no record lags here), else the
        next one asked; None if none passes."""
        vouches = Vouches(m.name)
        vouches.add(self._records(m.stage)[m.stage])
        for donor in vouches.donors(self.rng):
            if not self.members[donor.node].alive or self.members[donor.node].exited:
                continue  # its record outlives it: nobody answers
            try:  # hivemind serves state from its own thread, whatever the replica is doing
                meta, tensors = self._snapshot(donor.node)
            except RuntimeError:  # not in sync: it serves nothing
                continue
            try:
                step, digest = snapshot_digest(meta, tensors)
                verdict = vouches.verdict(step, digest)
            except ValueError as err:  # a malformed state
                verdict = str(err)
            if verdict == OK:
                return {**meta, "vouched": digest}, tensors
            m.machine.state.errors["bad_state"] += 1
            self.log.append(f"{self.now:.3f} {m.name} refused {donor.node}'s state: {verdict}")
        return None

    def _resync(self, m: Member) -> None:
        got = self._download(m)
        event = ev.StateLoaded(*got) if got else ev.StateLoaded()
        self._at(self.now + self.rng.uniform(0.05, 0.5), "notify", m.name, event)
