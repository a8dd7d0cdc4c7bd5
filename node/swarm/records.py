"""The one module that owns the swarm's DHT keys and record schemas (groundwork for issue #4).

Everything read from the DHT is untrusted input: any peer can store anything under any key. So
records are parsed with strict pydantic models, bounded in size, and a malformed one is skipped
with a log line, never raised into the caller. Values are plain dicts (what hivemind's msgpack
serializer carries); nothing here talks to a DHT, so this stays a pure, testable module.

Keys (document these in the README when #4 lands):
  {swarm}/manifest            -> Manifest        (subkey: none; the swarm's fixed config)
  {swarm}/stage/{k}           -> NodeRecord      (subkey: the node's peer id, one per replica)
"""

from __future__ import annotations

import logging
import math
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

SWARM_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}$")


def _check_swarm(swarm: str) -> str:
    if not SWARM_ID.match(swarm):
        raise ValueError(f"swarm id {swarm!r}: use 1-64 of a-z 0-9 . _ - (lower case)")
    return swarm


def manifest_key(swarm: str) -> str:
    return f"{_check_swarm(swarm)}/manifest"


def stage_key(swarm: str, stage: int) -> str:
    if stage < 0:
        raise ValueError(f"stage {stage} < 0")
    return f"{_check_swarm(swarm)}/stage/{stage}"


class NodeState(StrEnum):
    joining = "joining"
    online = "online"
    draining = "draining"


class NodeRecord(BaseModel):
    """What a node announces about itself under its stage's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    address: str = Field(max_length=260, description="public HOST:PORT of its stage service")
    state: NodeState
    throughput: float = Field(ge=0, description="microbatches per second it sustains")
    load: int = Field(ge=0, le=1_000_000, description="microbatches outstanding")
    version: str = Field(max_length=32)
    config_hash: str = Field(pattern=r"^[0-9a-f]{16}$")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not HOST_PORT.match(v) or not 0 < int(v.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"address {v!r} is not HOST:PORT")
        return v

    @field_validator("throughput")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("throughput must be finite")
        return v


def parse_stage_records(raw: Any, stage: int) -> dict[str, NodeRecord]:
    """{subkey: value} as read from a stage key -> the valid records, keyed by peer id.

    A record whose subkey is not its own peer id is refused too: a peer may only speak for itself.
    """
    if not isinstance(raw, dict):
        if raw is not None:
            log.warning(
                "stage %d: DHT value is a %s, not a dict of records; ignored",
                stage,
                type(raw).__name__,
            )
        return {}
    out: dict[str, NodeRecord] = {}
    for subkey, value in list(raw.items())[:10_000]:
        try:
            record = NodeRecord.model_validate(value)
        except ValidationError as err:
            log.warning(
                "stage %d: skipped a malformed record from %r: %s",
                stage,
                str(subkey)[:64],
                err.errors()[0]["msg"],
            )
            continue
        if record.peer_id != subkey:
            log.warning(
                "stage %d: skipped a record for %r stored under subkey %r",
                stage,
                record.peer_id,
                str(subkey)[:64],
            )
            continue
        out[record.peer_id] = record
    return out
