"""StageState: everything about a stage node that changes, in one place.

Handlers (flow.py, recovery.py, stepend.py) read and write it through the machine; nothing else
does. The step advances only in `enter_step`, which starts a fresh ledger and hands back the
messages that arrived early for the new step (they are handled before anything newer).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from node.ledger import StepLedger
from node.protocol.window import Window
from node.swarm.routing import split_share
from node.wire.messages import Forward, held_bytes

MAX_PEERS = 4096  # entries per peer table (links, dead ids, listed replicas): see prune_peers


@dataclass
class LinkInfo:
    side: str
    serial: int
    up: bool = True
    since: float = 0.0  # when this peer was first linked to us (a relink keeps it)


@dataclass
class Adoption:
    """A dead replica's part of one step, as its neighbours re-send it (recovery.py)."""

    dead: str
    step: int
    t0: float
    forwards: dict[int, Forward] = field(default_factory=dict)  # from upstream: the z it got
    up_of: dict[int, str] = field(default_factory=dict)
    grad_needed: dict[int, bool] = field(default_factory=dict)
    claims: dict[int, tuple[str, torch.Tensor | None]] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # neighbours that sent REPLAY_END
    lost: set[int] = field(default_factory=set)  # claimed, but nobody upstream had its z
    done: bool = False
    held: int = 0  # bytes of the tensors in forwards and claims (kept as they change: O(1))
    opened_by: str = ""  # the neighbour whose replay or report opened it
    unlisted: bool = False  # no View had listed `dead` then: that neighbour's word alone
    # does the adoption hold our step? Not while our View lists `dead` (a record in any state:
    # a neighbour's word alone, #10 M2), nor ever for an id no View listed lately
    confirmed: bool = True
    listed: bool = False  # our View listed `dead` when it opened: confirmed once none does

    def put_forward(self, i: int, msg: Forward, up: str, grad_needed: bool) -> None:
        old = self.forwards.get(i)
        self.held += held_bytes(msg) - (held_bytes(old) if old is not None else 0)
        self.forwards[i], self.up_of[i], self.grad_needed[i] = msg, up, grad_needed

    def put_claim(self, i: int, peer: str, grad: torch.Tensor | None) -> None:
        old = self.claims.get(i, (None, None))[1]
        self.held += _tensor_bytes(grad) - _tensor_bytes(old)
        self.claims[i] = (peer, grad)

    def drop_claim(self, i: int) -> None:
        self.held -= _tensor_bytes(self.claims.pop(i)[1])


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.element_size() * t.numel()


@dataclass
class StageState:
    node_id: str
    is_first: bool
    microbatches: int
    step: int = 0
    synced: bool = True
    was_synced: bool = False  # before the resync in progress
    loaded_step: int | None = None  # the step of the last replica state we loaded
    loaded_digest: str | None = None  # ...and the digest replicas vouched for it with
    group0: list[tuple[str, float]] | None = None  # stage 0: the last round's members
    # stage 0, overlapped: the ids of this step each of them began in the last one (split())
    begun0: dict[str, list[int]] = field(default_factory=dict)
    ledger: StepLedger = field(default_factory=lambda: StepLedger(0))
    prev_ledger: StepLedger | None = None
    # overlapped: finished steps' ledgers before prev_ledger (a neighbour may be that far
    # behind: position.reach), for replays and owed STEP_DONEs after a flap; `keep` of them
    # with prev_ledger (1 for 1f1b: prev_ledger alone)
    older: list[StepLedger] = field(default_factory=list)
    keep: int = 1
    # overlapped (schedule.py): step+1's first microbatches, taken while still in this step
    ahead: StepLedger | None = None
    early: list = field(default_factory=list)  # Received events for step + 1 (hold_early)
    early_bytes: int = 0  # what `early` holds (held_bytes), kept as it changes
    # redone forwards of this step (protocol/redo.py) come before our adoption is ready:
    # held for it (id -> (sender, Forward)), at most one per id
    redone_in: dict = field(default_factory=dict)
    links: dict[str, LinkInfo] = field(default_factory=dict)  # neighbour -> its newest link
    leaving: set[str] = field(default_factory=set)  # neighbours that announced they drain
    draining: bool = False
    told_leaving: bool = False  # our last averaging round said we leave (or had no peers)
    said_leaving: bool = False
    drained: bool = False  # our drain's round is done: we only linger for the stage (machine.py)
    finished_at: float | None = None  # reached --steps: lingering for the neighbours
    # recovery
    suspects: dict[str, tuple] = field(default_factory=dict)  # link lost: (side, why, since)
    flaps: dict[str, float] = field(default_factory=dict)  # link broke and came back: when
    view_at: float = float("-inf")  # when the last View (DHT records) came
    views: int = 0  # how many came
    # our stage's ids any View listed -> when a View last listed it (newest last)
    seen_replicas: dict[str, float] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    dead_at: dict[str, float] = field(default_factory=dict)
    lost_at: dict[str, float] = field(default_factory=dict)  # dead: when its link to us broke
    adoptions: dict[tuple[str, int], Adoption] = field(default_factory=dict)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (dead, side): no adopter yet
    replay_ends: dict[int, set[str]] = field(default_factory=dict)  # step -> who sent one
    hold_until: float | None = None  # stage 0 resumed a stage: wait for the claims first
    split_by: set[str] = field(default_factory=set)  # stage 0: who split step 0 without us
    hold_next: bool = False  # stage 0: hold the next step's dispatch for downstream's reports
    hold_for: str | None = None  # ...after adopting this dead stage-0 replica's part
    reported_on: dict[str, set[str]] = field(default_factory=dict)  # dead -> who reported it
    resumed_at: int | None = None  # a fixed pipeline's --resume step (see align_resumed)
    # the step's end
    round_fail_since: float | None = None
    split_since: float | None = None  # this step's first round refused for a missing replica
    round_input: tuple = (0.0, 0.0, 0)  # what we put in the round: gradient norm, loss, count
    round_attempts: int = 0
    round_peers: set[str] = field(default_factory=set)  # the last valid round's staying members
    # of those, the ones that counted microbatches: who our next round must have (#10 C1)
    round_workers: set[str] = field(default_factory=set)
    round_backoff: bool = False  # a round just failed: read what arrived before the next one
    joiner_expected_at: int | None = None  # a joiner downloaded our state at this step
    # (step, digest of our state at its start) for the last steps: what we vouch for to joiners
    vouches: list[tuple[int, str]] = field(default_factory=list)
    behind_since: float | None = None
    waiting_for: str | None = None  # "round" or "resync": an answer the machine waits for
    # measurements
    compute_s: float = 0.0
    compute_mark: float = 0.0
    s_per_mb: float = 0.0
    mb_per_s: float = 0.0  # measured compute throughput, announced in the DHT
    window: Window = field(default_factory=Window)  # stage 0: its in-flight window (window.py)
    window_size: int = 0  # ...as last sized (the step event reports it)
    last_loss: float | None = None
    step_t0: float = field(default_factory=time.perf_counter)
    stats: Counter = field(default_factory=Counter)  # counted, recomputed, rounds, lost...
    errors: Counter = field(default_factory=Counter)  # shared with the transport's refusals

    def __post_init__(self) -> None:
        self.ledger = StepLedger(self.step)

    # ---- the step ------------------------------------------------------------------------
    def enter_step(self, step: int) -> list:
        """The one place the step changes: a fresh ledger (the last step's is kept for replays),
        stage 0's share of it, and the early messages now due (the caller handles them first)."""
        # the last step's ledger, only if it is the step before: at start (and after a resync
        # or a resumed step) the old one is no step's predecessor, and a neighbour's report
        # must not say REPLAY_END for this step before its replays (found by the harness)
        last = self.ledger if self.ledger.step == step - 1 else None
        prev = self.prev_ledger
        if last is not None and prev is not None and prev.step == step - 2 and self.keep > 1:
            self.older = [*self.older, prev][-(self.keep - 1) :]
        else:
            self.older = []
        self.step = step
        self.window.forget(step)
        begun = self.ahead if self.ahead is not None and self.ahead.step == step else None
        self.prev_ledger, self.ledger, self.ahead = last, begun or StepLedger(step), None
        self.split_since = None  # the split check's patience is per step
        self.redone_in = {}
        self.step_t0 = time.perf_counter()
        if self.is_first and self.synced and self.group0:
            self.ledger.split = self.split()
            share = self.ledger.split.get(self.node_id, [])
            sent = self.ledger.z_out  # what stage 0 began ahead (overlapped)
            self.ledger.share, self.ledger.queue = list(share), [i for i in share if i not in sent]
        due, self.early, self.early_bytes = self.early, [], 0
        return due

    def split(self) -> dict[str, list[int]]:
        """Stage 0: this step's ids, split among the last round's members (routing.split_share),
        each keeping what it began early."""
        return split_share(self.group0 or [], self.microbatches, self.begun0)

    def kept(self) -> list[StepLedger]:
        """The ledgers of the finished steps kept, oldest first, then this step's."""
        return [*self.older, *(L for L in (self.prev_ledger, self.ledger) if L is not None)]

    def ledger_of(self, step: int) -> StepLedger | None:
        """The ledger of `step`: this step's, or the one begun ahead of it (overlapped)."""
        if step == self.ledger.step:
            return self.ledger
        return self.ahead if self.ahead is not None and self.ahead.step == step else None

    def hold_early(self, ev) -> None:
        """Keep a message of a step ahead (Received) until its step comes."""
        self.early.append(ev)
        self.early_bytes += held_bytes(ev.msg)

    def keep_early(self, keep) -> None:
        """Drop the early messages `keep(ev)` is false for."""
        self.early = [ev for ev in self.early if keep(ev)]
        self.early_bytes = sum(held_bytes(ev.msg) for ev in self.early)

    def holds_ahead(self) -> bool:
        """Overlapped: has this replica taken (or, stage 0, committed to) the next step's work?
        Then it stays for that step, draining or not (stepend.finish)."""
        A = self.ahead
        return A is not None and bool(A.share or A.came_from or A.sent_to or A.counted)

    def started(self) -> bool:
        L = self.ledger
        return bool(L.counted or L.sent_to or L.came_from or L.done_from or L.fwd_from)

    def full(self) -> bool:
        return self.ledger.counted == set(range(self.microbatches))

    def mark_dead(self, peer: str, now: float, since: float | None = None) -> None:
        self.dead.add(peer)
        self.dead_at[peer] = now
        self.lost_at[peer] = now if since is None else since
        self.flaps.pop(peer, None)

    def held_bytes(self) -> int:
        """Peers' tensors we hold beyond the step's own work: early messages and adoptions (a
        budget, limits.max_held_mb, bounds them together: #10 H5). Kept as counts, not summed
        per message: summing made filling the buffer quadratic (a review)."""
        return self.early_bytes + sum(a.held for a in self.adoptions.values())

    def recount_held(self) -> int:
        """`held_bytes` summed from scratch: the harness checks the kept counts against it."""
        n = sum(held_bytes(ev.msg) for ev in self.early)
        for a in self.adoptions.values():
            n += sum(held_bytes(f) for f in a.forwards.values())
            n += sum(_tensor_bytes(g) for _, g in a.claims.values())
        return n

    def early_room(self, msg, cap: int, budget: int) -> bool:
        return len(self.early) < cap and self.held_bytes() + held_bytes(msg) <= budget

    def saw_replicas(self, ids) -> None:
        for peer in ids:
            self.seen_replicas.pop(peer, None)
            self.seen_replicas[peer] = self.view_at

    def prune_peers(self) -> None:
        """Keep what the core knows per peer bounded: a stranger's fresh keys are free, and each
        one that links, is banned or is listed in the DHT left an entry here for ever (#10 H5).
        Only past MAX_PEERS entries of a kind, the oldest first, and never one that open work
        needs: an honest swarm never gets near the bound, so nothing it relies on changes."""
        busy = {dead for dead, _ in self.adoptions} | set(self.suspects) | {self.node_id}
        if len(self.links) > MAX_PEERS:
            down = [p for p, i in self.links.items() if not i.up and p not in busy]
            for peer in down[: len(self.links) - MAX_PEERS]:
                del self.links[peer]
        if len(self.dead) > MAX_PEERS:
            old = sorted((p for p in self.dead if p not in busy), key=self.dead_at.__getitem__)
            for peer in old[: len(self.dead) - MAX_PEERS]:
                self.dead.discard(peer)
                self.dead_at.pop(peer, None)
                self.lost_at.pop(peer, None)
        for table in (self.lost_at, self.dead_at):  # a flapped peer's, or one linked again
            for peer in [p for p in table if p not in self.dead][: max(len(table) - MAX_PEERS, 0)]:
                del table[peer]
        if len(self.flaps) > MAX_PEERS:
            old = sorted(self.flaps, key=self.flaps.__getitem__)
            for peer in old[: len(self.flaps) - MAX_PEERS]:
                del self.flaps[peer]
        if len(self.seen_replicas) > MAX_PEERS:  # least recently listed first
            for peer in list(self.seen_replicas)[: len(self.seen_replicas) - MAX_PEERS]:
                del self.seen_replicas[peer]

    # ---- links ---------------------------------------------------------------------------
    def live(self, side: str) -> dict[str, int]:
        return {p: i.serial for p, i in self.links.items() if i.side == side and i.up}

    def has_live(self, peer: str) -> bool:
        info = self.links.get(peer)
        return info is not None and info.up

    def side_of(self, peer: str) -> str | None:
        info = self.links.get(peer)
        return info.side if info is not None else None
