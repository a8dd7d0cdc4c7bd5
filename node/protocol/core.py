"""What the handlers of one StageMachine share: the settings, the runtime, the one mutable
StageState, the swarm view, and the list of effects being collected for the current event.

Each handler class (flow.py, recovery.py, stepend.py) holds this object and its collaborators
explicitly; none of them keeps state of its own.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.data import Batches
from node.protocol.events import Emit, Refuse, Send, Trace
from node.protocol.schedule import Schedule
from node.protocol.state import StageState
from node.protocol.view import SwarmView
from node.runtime import StageRuntime
from node.wire.messages import MessageError

log = logging.getLogger("node.protocol")

TURN_COMPUTES = 1  # runtime calls per turn of the machine (Core.turn_over)


def adopter_rank(peer: str, dead: str) -> bytes:
    """Who adopts `dead`'s work first: the same order at every neighbour and replica, another
    per dead node (the lowest id won every adoption, and a low id can be ground for: #10 H2)."""
    return hashlib.sha256(f"{dead}\0{peer}".encode()).digest()


@dataclass
class Core:
    cfg: Any  # NodeConfig: the settings the protocol reads (steps, timeouts, limits)
    k: int
    n_stages: int
    runtime: StageRuntime
    batches: Batches
    state: StageState
    view: SwarmView
    schedule: Schedule
    now: float = 0.0  # the current event's time (the driver's monotonic clock, or fake)
    effects: list = field(default_factory=list)
    computes: int = 0  # runtime calls in the current turn (turn_over)
    lock: threading.Lock = field(default_factory=threading.Lock)  # step vs state download
    # times compute (the measured s/microbatch behind routing and the window); the protocol
    # harness gives a fake one, else its runs would depend on how loaded the machine is
    clock: Callable[[], float] = time.perf_counter

    @property
    def M(self) -> int:
        return self.state.microbatches

    @property
    def held_budget(self) -> int:
        """Bytes of peers' tensors held for steps ahead and adoptions (StageState.held_bytes):
        limits.max_held_mb, but never below what an honest recovery may hold at once (two
        steps of a dead replica's tensors, as the outbox bound allows them to be sent:
        node/peering.py link_settings), decoded to fp32."""
        cfg = self.cfg
        tensor = 4 * cfg.batch_size * cfg.model.seq_len * cfg.model.boundary_dim + 1024
        return max(int(cfg.limits.max_held_mb * (1 << 20)), 4 * (2 * self.M + 16) * tensor)

    @property
    def is_first(self) -> bool:
        return self.k == 0

    @property
    def is_last(self) -> bool:
        return self.k == self.n_stages - 1

    @property
    def node_id(self) -> str:
        return self.state.node_id

    # ---- effects -------------------------------------------------------------------------
    def send(self, peer: str | None, msg) -> bool:
        """Post to a neighbour; one that is gone costs this message, not the node (recovery
        re-sends what it needs)."""
        if peer is None or not self.state.has_live(peer):
            self.state.errors["unsent"] += 1
            log.info("stage %d: could not send %s: no link to %s", self.k, type(msg).__name__, peer)
            return False
        self.effects.append(Send(peer, msg))
        return True

    def refuse(self, peer: str, error: MessageError) -> None:
        self.effects.append(Refuse(peer, error))

    def emit(self, kind: str, **fields: Any) -> None:
        self.effects.append(Emit(kind, fields))

    def trace(self, phase: str) -> None:
        self.effects.append(Trace(phase, self.state.step))

    def compute(self, fn, *args):
        """Run the stage runtime (synchronously: the machine is on the compute thread)."""
        t0 = self.clock()
        self.computes += 1
        try:
            return fn(*args)
        finally:
            self.state.compute_s += self.clock() - t0

    def turn_over(self) -> bool:
        """Has this turn (one `handle` call) run its microbatch? A turn runs at most one forward
        or backward of the data path, so that what it sends leaves before the next is computed:
        a turn that ran a whole batch of arrivals (or stage 0's whole window) sent nothing until
        the last was done, and each stage held its neighbour back by a burst's compute (the
        overlapped schedule's per-step loss at 50 ms, #11). The machine keeps the rest of the
        events for the next turn (StageMachine.more)."""
        return self.computes >= TURN_COMPUTES

    def presumed_dead(self, peer: str) -> bool:
        """Is `peer` dead as far as we know? A node restarted under the same id (systemd, `resbm
        join`) is a new process: once the dead one's DHT record has expired (records live
        record_ttl_s and are refreshed every refresh_s), a record under that id is the new
        one's, so it may be dialed again; a live link to it proves it outright."""
        s = self.state
        if peer not in s.dead or s.has_live(peer):
            return False
        horizon = self.cfg.record_ttl_s + 2 * self.cfg.refresh_s
        return self.now - s.dead_at.get(peer, self.now) < horizon

    def presumed_dead_set(self) -> set[str]:
        return {p for p in self.state.dead if self.presumed_dead(p)}
