"""`resbm node`'s config: one pipeline stage as a daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from node.config import MODEL_FLAGS, TrainConfig
from node.ops_config import (
    OPS_FLAGS,
    SECURITY_FLAGS,
    OpsConfig,
    PeerLimits,
    SecurityConfig,
    check_coordinator,
    check_multiaddrs,
)
from node.wire.kinds import NODE_ID_PATTERN, WireCodec

# a field's json_schema_extra marking a setting for tests and launchers, not for users
HIDDEN = {"hidden": True}


class NodeConfig(TrainConfig):
    """`resbm node`: one stage of the pipeline as a daemon. Training settings are the reference
    trainer's, so the same flags give the same maths."""

    stage: int = Field(0, ge=0, description="which pipeline stage this node runs")
    listen: str = Field("0.0.0.0:0", description="HOST:PORT to accept links on (0 = any port)")
    next: str | None = Field(None, description="HOST:PORT of the next stage's node, to dial")
    wire_codec: WireCodec = WireCodec.int4_channel  # see ModelConfig.compression
    events: Path | None = Field(None, description="JSON-lines file of node events (ready, steps)")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long to keep dialing --next")
    base_timeout_s: float = Field(30.0, gt=0, description="slack added to every deadline")
    compute_timeout_s: float = Field(
        300.0, gt=0, description="how long stage 0 allows the other stages' compute per step"
    )
    min_bandwidth_mbps: float = Field(1.0, gt=0, description="deadlines assume this much")
    max_in_flight: int = Field(
        0,
        ge=0,
        description="stage 0's microbatches in flight; 0 = sized at run time from the measured "
        "round trip and compute time, at least the schedule's (node/protocol/window.py)",
    )
    activation_memory_mb: float = Field(
        4096.0,
        gt=0,
        description="memory a stage may spend on in-flight microbatches' activations: bounds "
        "the window sized at run time (max_in_flight 0)",
    )
    schedule: Literal["1f1b", "overlapped"] = Field(
        "1f1b", description="pipeline schedule (node/protocol/schedule.py); the swarm shares it"
    )
    max_message_mb: float = Field(
        8.0,
        gt=0,
        description="largest gRPC message sent: tensors go in chunks of a quarter of it, never "
        "over 128 KiB (what every node reads)",
    )
    # ---- swarm (#4): without `swarm` the node runs a fixed pipeline from --next ----
    swarm: str | None = Field(None, description="swarm id; set to find peers in the DHT")
    initial_peers: list[str] = Field(default_factory=list, description="DHT multiaddrs")
    dht_listen: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], description="DHT host multiaddrs"
    )
    coordinator: str | None = Field(None, description="HOST:PORT of a coordinator to join via")
    coordinator_id: str | None = Field(
        None,
        pattern=NODE_ID_PATTERN,
        description="the coordinator whose manifest and move requests this node takes (others' "
        "are anyone's word); set from the coordinator's Join answer when not given, and a "
        "coordinator holding another key is refused",
    )
    coordinator_learned: bool = Field(
        False,
        description="coordinator_id came from a Join answer, not from the user: a restarted "
        "coordinator's new key replaces it",
        json_schema_extra=HIDDEN,
    )
    wanted_stage: int | None = Field(
        None, ge=0, description="with a coordinator: ask for this stage (default: it picks)"
    )
    identity_file: Path | None = Field(
        None,
        description="this node's Ed25519 key (made, mode 0600, if missing); its node id is "
        "derived from it. Default: a fresh key, so a new id, each start",
    )
    node_id: str | None = Field(
        None,
        pattern=NODE_ID_PATTERN,
        description="derived from the key (identity_file) when the node starts; if set, it "
        "must be that key's id",
        json_schema_extra=HIDDEN,
    )
    announce: str | None = Field(None, description="HOST:PORT peers dial; default 127.0.0.1:port")
    refresh_s: float = Field(1.0, gt=0, description="DHT announce / membership refresh period")
    record_ttl_s: float = Field(5.0, gt=0, description="a silent node's record expires after")
    replicas_hint: int = Field(0, ge=0, description="expected replicas per stage; 0 = unknown")
    matchmaking_s: float = Field(1.0, gt=0, description="averaging: max wait to form a group")
    allreduce_timeout_s: float = Field(
        30.0, gt=0, description="averaging: one round's exchange of vectors"
    )
    round_timeout_s: float = Field(300.0, gt=0, description="give up agreeing on a step after")
    state_timeout_s: float = Field(
        120.0, gt=0, description="joining: one download of a replica's state, whole"
    )
    adopt_wait_s: float = Field(
        45.0, gt=0, description="recovery: wait this long for every neighbour's replays"
    )
    reachable: bool = Field(
        True,
        description="peers can dial this node's --announce address; false (behind NAT): it "
        "dials both neighbouring stages itself and announces no address",
    )
    swarm_data: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{16}$",
        description="the swarm's data fingerprint when --data is not here (set by `resbm join`): "
        "a middle stage needs no data; stage 0 and the last stage fetch the manifest's "
        "data_source",
    )
    # ---- operations (#5): security, per-peer limits, logs, metrics ----
    security: SecurityConfig = SecurityConfig()
    limits: PeerLimits = PeerLimits()
    ops: OpsConfig = OpsConfig()
    # ---- fault injection, for tests and `resbm simulate --chaos` ----
    # HIDDEN: set by launchers and tests only, so `resbm config show` leaves them out
    fail_at_step: int | None = Field(
        None, ge=0, description="SIGKILL own process group at...", json_schema_extra=HIDDEN
    )
    fail_phase: Literal["forward", "backward", "round", "garbage"] = Field(
        "backward",
        description="...after the first forward / backward of that step, or before "
        "its averaging round; `garbage`: instead send one absurd activation (x1e6), as a "
        "broken GPU would, and get banned",
        json_schema_extra=HIDDEN,
    )

    ASKS: ClassVar[bool] = False  # `resbm join` asks the coordinator for the swarm id

    @field_validator("initial_peers", "dht_listen")
    @classmethod
    def _maddrs(cls, v: list[str]) -> list[str]:
        return check_multiaddrs(v)

    @field_validator("coordinator")
    @classmethod
    def _coordinator_address(cls, v: str | None) -> str | None:
        return check_coordinator(v) if v else None  # also from RESBM_* or --config ("": none)

    @model_validator(mode="after")
    def _stage_exists(self) -> NodeConfig:
        if self.model.n_stages < 2:
            raise ValueError("a pipeline needs n_stages >= 2 (--stages); `resbm train` runs one")
        if not self.reachable and self.swarm is None and not (self.coordinator and self.ASKS):
            raise ValueError("--no-reachable needs a swarm (--swarm): peers find it in the DHT")
        if self.swarm is None and (self.initial_peers or (self.coordinator and not self.ASKS)):
            raise ValueError("coordinator / initial_peers need a swarm id (--swarm)")
        if self.stage >= self.model.n_stages:
            raise ValueError(
                f"stage {self.stage} does not exist: the model has {self.model.n_stages} stages "
                "(--stage counts from 0)"
            )
        return self


NODE_FLAGS: dict[str, tuple[str, dict]] = {
    **MODEL_FLAGS,
    "stage": ("stage", {"type": int, "metavar": "K", "help": "pipeline stage to run (0-based)"}),
    "listen": (
        "listen",
        {"metavar": "HOST:PORT", "help": "where to accept links; port 0 = any"},
    ),
    "next": ("next", {"metavar": "HOST:PORT", "help": "the next stage's node, to dial"}),
    "wire_codec": (
        "wire-codec",
        {
            "choices": [c.value for c in WireCodec],
            "help": "boundary tensor codec (default int4-channel)",
        },
    ),
    "events": ("events", {"metavar": "PATH", "help": "write JSON-lines events here"}),
    "checkpoint_dir": (
        "checkpoint-dir",
        {"metavar": "DIR", "help": "where this stage's checkpoint goes"},
    ),
    "checkpoint_every": (
        "checkpoint-every",
        {"type": int, "metavar": "STEPS", "help": "steps between checkpoints; 0 = at the end"},
    ),
    "connect_timeout_s": (
        "connect-timeout",
        {"type": float, "metavar": "S", "help": "seconds to keep dialing --next"},
    ),
    "max_message_mb": (
        "max-message-mb",
        {"type": float, "metavar": "MB", "help": "largest gRPC message sent (chunks <= 128 KiB)"},
    ),
    "max_in_flight": (
        "max-in-flight",
        {
            "type": int,
            "metavar": "N",
            "help": "microbatches in flight (default 0: sized from the measured round trip)",
        },
    ),
    "activation_memory_mb": (
        "activation-memory-mb",
        {"type": float, "metavar": "MB", "help": "bounds that window's activations (4096)"},
    ),
    "schedule": (
        "schedule",
        {
            "choices": ["1f1b", "overlapped"],
            "help": "pipeline schedule, shared by the swarm (default 1f1b; node/trainer.py)",
        },
    ),
    "overlap": (
        "overlap",
        {"type": int, "metavar": "N", "help": "overlapped: microbatches begun before the update"},
    ),
    "predict_weights": (
        "predict-weights",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "overlapped: at the weights extrapolated by the last update (default on)",
        },
    ),
    "predict_scale": (
        "predict-scale",
        {"type": float, "metavar": "A", "help": "overlapped: how far along it, 0-1 (1)"},
    ),
    "base_timeout_s": (
        "base-timeout",
        {"type": float, "metavar": "S", "help": "slack on every deadline, in seconds"},
    ),
    "compute_timeout_s": (
        "compute-timeout",
        {"type": float, "metavar": "S", "help": "seconds stage 0 allows the others' compute"},
    ),
    "min_bandwidth_mbps": (
        "min-bandwidth-mbps",
        {"type": float, "metavar": "MBPS", "help": "the bandwidth deadlines assume"},
    ),
    "swarm": ("swarm", {"metavar": "ID", "help": "swarm id: find peers through hivemind's DHT"}),
    "initial_peers": (
        "initial-peers",
        {"nargs": "+", "metavar": "MULTIADDR", "help": "DHT multiaddrs to bootstrap from"},
    ),
    "dht_listen": (
        "dht-listen",
        {"nargs": "+", "metavar": "MULTIADDR", "help": "DHT host multiaddrs"},
    ),
    "coordinator": (
        "coordinator",
        {"metavar": "HOST:PORT", "help": "the coordinator to join the swarm through"},
    ),
    "coordinator_id": (
        "coordinator-id",
        {
            "metavar": "ID",
            "help": "pin the swarm's coordinator (its id, n-...): only its manifest and moves "
            "count (default: the id its Join answer names)",
        },
    ),
    "wanted_stage": (
        "wanted-stage",
        {"type": int, "metavar": "K", "help": "ask the coordinator for this stage (default: any)"},
    ),
    "identity_file": (
        "identity-file",
        {
            "type": Path,
            "metavar": "PATH",
            "help": "this node's key (made if missing); the node id is derived from it "
            "(default: a fresh key each start)",
        },
    ),
    "announce": (
        "announce",
        {"metavar": "HOST:PORT", "help": "address peers dial (default: 127.0.0.1 and the port)"},
    ),
    "replicas_hint": (
        "replicas-hint",
        {"type": int, "metavar": "N", "help": "expected replicas per stage; 0 = unknown"},
    ),
    "reachable": (
        "reachable",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "--no-reachable: behind NAT, dial out to both neighbours (default reachable)",
        },
    ),
    "limits.ban_s": (
        "ban-s",
        {"type": float, "metavar": "S", "help": "seconds a garbage peer stays banned"},
    ),
    **SECURITY_FLAGS,
    **OPS_FLAGS,
    "resume": (
        "resume",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "continue from --checkpoint-dir (default off)",
        },
    ),
}
