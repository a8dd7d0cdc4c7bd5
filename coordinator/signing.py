"""Join and Leave signed by the node they name (#10 H6).

Before, anyone could send `Leave(victim)` (the coordinator then wrote the victim's tombstone and
it vanished from the swarm: visible in 0 of 15 status reads) or `Join(victim)` (its placeholder
overwrote the victim's record). Now a request carries the public key its node id is derived from
(common/identity.py) and a signature over its fields, the coordinator's swarm and the time:

- a request for one swarm, or of one kind, never passes for another;
- one signed more than `MAX_SKEW_S` from the coordinator's clock is refused, and so is one older
  than the newest this coordinator has taken from that node (`Replays`): a captured Leave
  cannot be sent again after the node's next request. The same request sent twice (a client's
  retry after a lost reply) passes: it does what it did the first time.

What it does not stop: a peer with many keys joining as many nodes (ids are cheap; see
docs/security.md), or records written to the DHT directly, not through the coordinator.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import replace

from common.identity import Identity, transcript, verify
from coordinator.messages import JoinRequest, LeaveRequest, Signature

DOMAIN = "resbm-coordinator/1"
MAX_SKEW_S = 300.0  # clocks of volunteers' machines: NTP keeps them within seconds
REPLAY_TABLE = 65536  # node ids remembered; the oldest forgotten first

Request = JoinRequest | LeaveRequest


def _fields(req: Request, swarm: str) -> tuple:
    if isinstance(req, JoinRequest):
        settings = "" if req.settings is None else json.dumps(req.settings, sort_keys=True)
        return (
            "join", swarm, req.node_id, req.swarm, req.version, req.fingerprint,
            repr(float(req.throughput)), req.wanted_stage, settings,
        )  # fmt: skip
    return ("leave", swarm, req.node_id, req.stage)


def signed_bytes(req: Request, swarm: str, signed_at: float) -> bytes:
    return transcript(DOMAIN, *_fields(req, swarm), repr(float(signed_at)))


def sign(req: Request, swarm: str, identity: Identity, now: float | None = None) -> Request:
    """`req` signed by `identity` for the coordinator of `swarm`."""
    at = time.time() if now is None else now
    sig = identity.sign(signed_bytes(req, swarm, at))
    return replace(req, signed=Signature(identity.public_key, at, sig))


def check(req: Request, swarm: str, now: float | None = None) -> str | None:
    """Why `req` is not proven to come from the node it names (None: it is)."""
    s = req.signed
    if s is None:
        return (
            f"node {req.node_id} did not sign its request: resbm before 0.5 does not; "
            "upgrade the node"
        )
    now = time.time() if now is None else now
    if not abs(now - s.signed_at) <= MAX_SKEW_S:  # also NaN
        return (
            f"the request was signed at {s.signed_at:.0f}, {s.signed_at - now:+.0f} s from this "
            f"coordinator's clock (at most {MAX_SKEW_S:.0f} s): check the node's clock (NTP)"
        )
    return verify(req.node_id, s.public_key, signed_bytes(req, swarm, s.signed_at), s.signature)


class Replays:
    """The newest signing time taken from each node: an older request of it is a replay.
    Entries older than the clock window are pruned (such a request is refused anyway); a table
    full of recent ones refuses new nodes rather than forget old ones: forgetting let a flood
    of fresh keys push a node out, and its captured requests replay (review)."""

    def __init__(self, size: int = REPLAY_TABLE):
        self.size = size
        self._last: OrderedDict[str, float] = OrderedDict()

    def stale(self, req: Request, now: float | None = None) -> str | None:
        assert req.signed is not None
        last = self._last.get(req.node_id)
        if last is not None and req.signed.signed_at < last:
            return (
                f"node {req.node_id} sent a newer request (signed at {last:.3f}) than this one "
                f"({req.signed.signed_at:.3f}): a replay, or a clock that went back"
            )
        if last is None and len(self._last) >= self.size:
            self._prune(time.time() if now is None else now)
            if len(self._last) >= self.size:
                return (
                    f"this coordinator took requests from {len(self._last)} nodes in the last "
                    f"{MAX_SKEW_S:.0f} s, its limit: retry in a few minutes"
                )
        return None

    def take(self, req: Request) -> None:
        assert req.signed is not None
        self._last[req.node_id] = max(req.signed.signed_at, self._last.get(req.node_id, 0.0))
        self._last.move_to_end(req.node_id)

    def _prune(self, now: float) -> None:
        for node in [n for n, t in self._last.items() if t < now - MAX_SKEW_S]:
            del self._last[node]
