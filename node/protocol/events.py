"""What goes into a StageMachine (events) and what comes out of it (effects).

Peers are named by node id; a link by its serial, so a late LinkDown of a link that was already
replaced (a flap) is told apart from the death of the peer. Tensors travel inside the wire
messages (node/wire/messages.py), which are plain dataclasses: protobuf stays at the edge.

Compute is not an effect: the stage runtime (node/runtime.py) is synchronous and deterministic,
and the machine runs on the node's one compute thread, so a handler calls it directly and a
microbatch's walk through a stage is one handler, not a continuation spread over two events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from node.swarm.records import NodeRecord
from node.wire.messages import MessageError


# ---- events --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkUp:
    peer: str
    side: str  # "up": a replica of stage k-1; "down": of stage k+1
    serial: int


@dataclass(frozen=True)
class LinkDown:
    peer: str
    side: str
    serial: int
    reason: str


@dataclass(frozen=True)
class Received:
    """A validated message (decoded, shape- and outlier-checked by the transport) from a peer."""

    peer: str
    side: str
    msg: Any  # Forward, Backward, Notice or ErrorReport


@dataclass(frozen=True)
class RoundDone:
    """The answer to an Average effect: hivemind's Round, or None (no group, timed out)."""

    result: Any
    seconds: float = 0.0  # how long the round took


@dataclass(frozen=True)
class StateLoaded:
    """The answer to a Resync effect: a replica's state (meta, tensors), or None: none came."""

    meta: dict | None = None
    tensors: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class View:
    """The stage's neighbourhood as the DHT last showed it: records of stages k-1, k, k+1
    (already filtered to this swarm's config). Records are untrusted hints, never orders."""

    records: dict[int, dict[str, NodeRecord]]


@dataclass(frozen=True)
class Tick:
    """Time passed with nothing else to report."""


@dataclass(frozen=True)
class Stop:
    """SIGINT/SIGTERM or a move request: drain (finish this step's work, then leave)."""


# ---- effects -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    peer: str
    msg: Any


@dataclass(frozen=True)
class Refuse:
    """Tell `peer` what was refused and why (garbage codes ban it: node/guard.py)."""

    peer: str
    error: MessageError


@dataclass(frozen=True)
class Average:
    """Run one averaging round with the stage's replicas; answer with RoundDone."""

    grads: torch.Tensor
    loss_sum: float
    info: dict[str, Any]
    timeout_s: float


@dataclass(frozen=True)
class Resync:
    """Download the stage's state from a replica; answer with StateLoaded."""


@dataclass(frozen=True)
class Announce:
    """Re-publish this node's DHT record now (its state changed)."""

    leaving: bool = False


@dataclass(frozen=True)
class ShareState:
    """Offer (or stop offering) this replica's state to joiners."""

    allow: bool


@dataclass(frozen=True)
class SaveCheckpoint:
    step: int
    announce: bool = True


@dataclass(frozen=True)
class Emit:
    """One line of the node's event log (node/events.py)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    """A point of the schedule (forward, backward, round) was reached: what the chaos mode and
    the harness cut a node at. The daemon ignores it unless fault injection is configured."""

    phase: str
    step: int


@dataclass(frozen=True)
class Exit:
    code: int
    reason: str


__all__ = [
    "Announce",
    "Average",
    "Emit",
    "Exit",
    "LinkDown",
    "LinkUp",
    "Received",
    "Refuse",
    "Resync",
    "RoundDone",
    "SaveCheckpoint",
    "Send",
    "ShareState",
    "StateLoaded",
    "Stop",
    "Tick",
    "Trace",
    "View",
]
