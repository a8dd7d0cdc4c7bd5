"""`resbm node`'s config: one pipeline stage as a daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from node.config import MODEL_FLAGS, TrainConfig
from node.ops_config import OPS_FLAGS, SECURITY_FLAGS, OpsConfig, PeerLimits, SecurityConfig
from node.wire.kinds import WireCodec


class NodeConfig(TrainConfig):
    """`resbm node`: one stage of the pipeline as a daemon. Training settings are the reference
    trainer's, so the same flags give the same maths."""

    stage: int = Field(0, ge=0, description="which pipeline stage this node runs")
    listen: str = Field("0.0.0.0:0", description="HOST:PORT to accept links on (0 = any port)")
    next: str | None = Field(None, description="HOST:PORT of the next stage's node, to dial")
    wire_codec: WireCodec = WireCodec.bf16
    events: Path | None = Field(None, description="JSON-lines file of node events (ready, steps)")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long to keep dialing --next")
    base_timeout_s: float = Field(30.0, gt=0, description="slack added to every deadline")
    compute_timeout_s: float = Field(
        300.0, gt=0, description="how long stage 0 allows the other stages' compute per step"
    )
    min_bandwidth_mbps: float = Field(1.0, gt=0, description="deadlines assume this much")
    max_in_flight: int = Field(0, ge=0, description="microbatches in flight; 0 = stages (1F1B)")
    max_message_mb: float = Field(8.0, gt=0, description="largest gRPC message accepted")
    # ---- swarm (#4): without `swarm` the node runs a fixed pipeline from --next ----
    swarm: str | None = Field(None, description="swarm id; set to find peers in the DHT")
    initial_peers: list[str] = Field(default_factory=list, description="DHT multiaddrs")
    dht_listen: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], description="DHT host multiaddrs"
    )
    coordinator: str | None = Field(None, description="HOST:PORT of a coordinator to join via")
    wanted_stage: int | None = Field(
        None, ge=0, description="with a coordinator: ask for this stage (default: it picks)"
    )
    node_id: str | None = Field(None, description="this node's id; default: a random one")
    announce: str | None = Field(None, description="HOST:PORT peers dial; default 127.0.0.1:port")
    refresh_s: float = Field(1.0, gt=0, description="DHT announce / membership refresh period")
    record_ttl_s: float = Field(5.0, gt=0, description="a silent node's record expires after")
    replicas_hint: int = Field(0, ge=0, description="expected replicas per stage; 0 = unknown")
    matchmaking_s: float = Field(1.0, gt=0, description="averaging: max wait to form a group")
    allreduce_timeout_s: float = Field(30.0, gt=0, description="averaging: one all-reduce")
    round_timeout_s: float = Field(300.0, gt=0, description="give up agreeing on a step after")
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
    fail_at_step: int | None = Field(None, ge=0, description="SIGKILL own process group at...")
    fail_phase: Literal["forward", "backward", "round", "garbage"] = Field(
        "backward",
        description="...after the first forward / backward of that step, or before "
        "its averaging round; `garbage`: instead send one absurd activation (x1e6), as a "
        "broken GPU would, and get banned",
    )

    ASKS: ClassVar[bool] = False  # `resbm join` asks the coordinator for the swarm id

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
    "stage": ("stage", {"type": int, "help": "pipeline stage to run (0-based)"}),
    "listen": ("listen", {"help": "HOST:PORT to accept links on (default 0.0.0.0:0)"}),
    "next": ("next", {"help": "HOST:PORT of the next stage"}),
    "wire_codec": (
        "wire-codec",
        {"choices": [c.value for c in WireCodec], "help": "boundary tensor codec (default bf16)"},
    ),
    "events": ("events", {"help": "write JSON-lines events here"}),
    "checkpoint_dir": ("checkpoint-dir", {"help": "where this stage's checkpoint goes"}),
    "checkpoint_every": ("checkpoint-every", {"type": int, "help": "0 = only at the end"}),
    "connect_timeout_s": ("connect-timeout", {"type": float}),
    "max_message_mb": ("max-message-mb", {"type": float, "help": "largest gRPC message (8)"}),
    "max_in_flight": ("max-in-flight", {"type": int, "help": "0 = number of stages (1F1B)"}),
    "base_timeout_s": ("base-timeout", {"type": float, "help": "slack on every deadline (s)"}),
    "compute_timeout_s": ("compute-timeout", {"type": float, "help": "time for peers' compute"}),
    "min_bandwidth_mbps": ("min-bandwidth-mbps", {"type": float, "help": "deadline basis"}),
    "swarm": ("swarm", {"help": "swarm id: find peers through hivemind's DHT"}),
    "initial_peers": ("initial-peers", {"nargs": "+", "help": "DHT multiaddrs to bootstrap"}),
    "dht_listen": ("dht-listen", {"nargs": "+", "help": "DHT host multiaddrs"}),
    "coordinator": ("coordinator", {"help": "HOST:PORT of the coordinator to join via"}),
    "wanted_stage": ("wanted-stage", {"type": int, "help": "ask the coordinator for this stage"}),
    "node_id": ("node-id", {"help": "this node's id (default: random)"}),
    "announce": ("announce", {"help": "public HOST:PORT of this node's stage service"}),
    "replicas_hint": ("replicas-hint", {"type": int, "help": "expected replicas per stage"}),
    "reachable": (
        "reachable",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "--no-reachable: behind NAT, dial out to both neighbours (default reachable)",
        },
    ),
    "limits.ban_s": ("ban-s", {"type": float, "help": "seconds a garbage peer stays banned"}),
    **SECURITY_FLAGS,
    **OPS_FLAGS,
    "resume": (
        "resume",
        {"action": argparse.BooleanOptionalAction, "help": "continue from --checkpoint-dir"},
    ),
}
