"""The one module that owns the swarm's DHT keys and record schemas.

Everything read from the DHT is untrusted input: any peer can store anything under any key. So
records are parsed with strict pydantic models, bounded in size, and a malformed one is skipped
with a log line, never raised into the caller. Values are plain dicts (what hivemind's msgpack
serializer carries); nothing here talks to a DHT, so this stays a pure, testable module.

Keys (also documented in the README):
  {swarm}/manifest            -> Manifest        (subkey: its signer's id; the swarm's config)
  {swarm}/stage/{k}           -> NodeRecord      (subkey: the node's id, one per replica)
  {swarm}/checkpoints/{k}     -> CheckpointRecord (subkey: node id; where a stage's checkpoint is)
  {swarm}/moves               -> MoveList        (subkey: the coordinator's id; its open moves)
  {swarm}/joins/{k}           -> JoinList        (subkey: the coordinator's id; joiners it placed)

Records under a node id (stage, checkpoints; the manifest and moves under their signer's id) are
sealed by that key: node/swarm/owned.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.identity import is_node_id

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


def checkpoint_key(swarm: str, stage: int) -> str:
    if stage < 0:
        raise ValueError(f"stage {stage} < 0")
    return f"{_check_swarm(swarm)}/checkpoints/{stage}"


def moves_key(swarm: str) -> str:
    return f"{_check_swarm(swarm)}/moves"


def joins_key(swarm: str, stage: int) -> str:
    if stage < 0:
        raise ValueError(f"stage {stage} < 0")
    return f"{_check_swarm(swarm)}/joins/{stage}"


def averaging_prefix(swarm: str, stage: int) -> str:
    """hivemind averager prefix (matchmaking and state-download keys) of a stage's replicas;
    hivemind forbids '.' in it."""
    return f"{_check_swarm(swarm).replace('.', '_')}/avg/{stage}"


# valid HOST:PORTs that resolve nowhere (.invalid is reserved): a joiner's placeholder record
# (coordinator), and a node that cannot accept connections (behind NAT): it dials its neighbours
PENDING_ADDRESS = "pending.invalid:1"
DIAL_OUT_ONLY = "dial-out.invalid:1"


class NodeState(StrEnum):
    joining = "joining"
    online = "online"
    draining = "draining"


MAX_VOUCHES = 16  # the last steps a replica vouches for: a download spans several steps
AVERAGER_ID = r"^[1-9A-HJ-NP-Za-km-z]{1,128}$"  # a hivemind peer id, base58


class Vouch(BaseModel):
    """That a synced replica held the state with this digest at the start of `step`
    (node/checkpoint.py state_digest). A joiner takes a downloaded state only if replicas vouch
    for its digest (node/protocol/vouching.py); records are sealed by their node, so nobody
    vouches in another's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=0)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


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
    step: int = Field(0, ge=0, description="the step this node is working on")
    loss: float | None = Field(None, description="last stage: the swarm's loss at step - 1")
    averager: str | None = Field(None, pattern=AVERAGER_ID, description="its state's donor")
    vouches: list[Vouch] = Field([], max_length=MAX_VOUCHES, description="held, newest last")

    @property
    def dialable(self) -> bool:
        """Can a neighbour open a link to it? (Otherwise it dials its neighbours itself.)"""
        return self.address not in (PENDING_ADDRESS, DIAL_OUT_ONLY)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not HOST_PORT.match(v) or not 0 < int(v.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"address {v!r} is not HOST:PORT")
        return v

    @field_validator("throughput", "loss")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class Manifest(BaseModel):
    """The swarm's fixed config, stored once per swarm; see node/swarm/manifest.py."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    swarm: str = Field(max_length=64)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    version: str = Field(max_length=32)
    settings: dict[str, Any]
    steps: int = Field(ge=1)
    # where stage 0 and the last stage fetch the prepared data when a joiner has no --data
    # (node/datasource.py); its shards are checked against settings["data"] before use
    data_source: str | None = Field(None, max_length=512)

    @field_validator("settings")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(repr(v)) > 16_384:
            raise ValueError("settings too large")
        return v


class CheckpointRecord(BaseModel):
    """That a node keeps a checkpoint of its stage, and in which directory, named by a tag, not
    a path: an absolute path told every DHT reader its user names (#10 M3). A node that lost
    every replica of its stage resumes from its own --checkpoint-dir when a record carries
    that directory's tag (a restarted node, or replicas sharing a directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    place: str = Field(pattern=r"^[0-9a-f]{16}$", description="checkpoint_place(directory)")
    step: int = Field(ge=0)


def checkpoint_place(directory, swarm: str) -> str:
    """The tag of a checkpoint directory in `swarm`: equal for one directory, whoever names it."""
    resolved = str(Path(directory).expanduser().resolve())
    return hashlib.sha256(f"{swarm}\0{resolved}".encode()).hexdigest()[:16]


class MoveRecord(BaseModel):
    """The coordinator asks a node to move: it drains, then restarts serving `to_stage`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    from_stage: int = Field(ge=0)
    to_stage: int = Field(ge=0)


class Placeholder(BaseModel):
    """A joiner the coordinator just placed, until `until` (DHT time): so the next Join sees
    it before the node announces itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: NodeRecord
    until: float


class JoinList(BaseModel):
    """The coordinator's placeholders of one stage, one sealed record (node/swarm/dht.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    joins: list[Placeholder] = Field(max_length=256)


def parse_joins(raw: Any, stage: int) -> list[Placeholder]:
    """The coordinator's sealed payload -> its placeholders of `stage`; none if malformed."""
    if raw is None:
        return []
    try:
        return list(JoinList.model_validate(raw).joins)
    except ValidationError as err:
        log.warning("stage %d: skipped malformed placeholders: %s", stage, err.errors()[0]["msg"])
        return []


class MoveList(BaseModel):
    """The coordinator's open move requests, one sealed record (node/swarm/dht.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    moves: list[MoveRecord] = Field(max_length=1024)


def parse_moves(raw: Any) -> dict[str, MoveRecord]:
    """The coordinator's sealed payload -> {node id: move}; nothing if malformed."""
    if raw is None:
        return {}
    try:
        found = MoveList.model_validate(raw).moves
    except ValidationError as err:
        log.warning("skipped the coordinator's malformed moves: %s", err.errors()[0]["msg"])
        return {}
    return {m.peer_id: m for m in found if is_node_id(m.peer_id)}


def parse_manifest(raw: Any) -> Manifest | None:
    if raw is None:
        return None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        log.warning("skipped a malformed swarm manifest: %s", err.errors()[0]["msg"])
        return None


def parse_subkeyed(raw: Any, model: type[BaseModel], what: str, prefix: str = "") -> dict[str, Any]:
    """{subkey: value} -> {peer id: model}, skipping (with a log line) malformed values and
    records stored under someone else's id (subkey: `prefix` + the record's peer id)."""
    if not isinstance(raw, dict):
        if raw is not None:
            log.warning("%s: DHT value is a %s, not a dict; ignored", what, type(raw).__name__)
        return {}
    out: dict[str, Any] = {}
    for subkey, value in list(raw.items())[:10_000]:
        try:
            record = model.model_validate(value)
        except ValidationError as err:
            log.warning(
                "%s: skipped a malformed record from %r: %s",
                what,
                str(subkey)[:64],
                err.errors()[0]["msg"],
            )
            continue
        if prefix + record.peer_id != subkey:
            log.warning(
                "%s: skipped a record for %r stored under subkey %r",
                what,
                record.peer_id,
                str(subkey)[:64],
            )
            continue
        out[record.peer_id] = record
    return out


def parse_checkpoint_records(raw: Any, stage: int) -> dict[str, CheckpointRecord]:
    return parse_subkeyed(raw, CheckpointRecord, f"stage {stage} checkpoints")


def parse_stage_records(raw: Any, stage: int) -> dict[str, NodeRecord]:
    """{subkey: value} as read from a stage key -> the valid records, keyed by peer id."""
    return parse_subkeyed(raw, NodeRecord, f"stage {stage}")
