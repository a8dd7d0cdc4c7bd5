"""`resbm coordinator`'s config: the swarm's training settings (they make its manifest) plus where
the coordinator listens and how it treats the DHT records it reads and writes.

The training settings are `TrainConfig`'s, so the same flags that start a node describe the swarm
a coordinator serves; a coordinator whose settings differ from the manifest already in the DHT
refuses to start. Torch-, gRPC- and hivemind-free: `resbm --help` loads this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from node.config import DEVICE_FLAGS, MODEL_FLAGS, TRAIN_FLAGS, TrainConfig
from node.ops_config import (
    OPS_FLAGS,
    SECURITY_FLAGS,
    OpsConfig,
    SecurityConfig,
    check_host_port,
    check_multiaddrs,
)
from node.swarm.records import HOST_PORT, SWARM_ID
from node.wire.kinds import WireCodec


class CoordinatorConfig(TrainConfig):
    """One swarm's coordinator. TTLs are in seconds of DHT time."""

    swarm: str = Field("local", description="swarm id: the namespace of every DHT key")
    schedule: Literal["1f1b", "overlapped"] = Field(
        "1f1b", description="pipeline schedule, in the manifest"
    )
    wire_codec: WireCodec = Field(
        WireCodec.int4_channel, description="part of the swarm's manifest"
    )
    data_source: str | None = Field(
        None,
        max_length=512,
        description="where joiners fetch the prepared data (a local path, https:// or hf://); "
        "announced in the manifest, checked against the data fingerprint",
    )
    listen: str = Field("0.0.0.0:0", description="HOST:PORT of the gRPC service (0 = any port)")
    dht_listen: list[str] = Field(
        ["/ip4/0.0.0.0/tcp/0"],
        description="multiaddrs the coordinator's DHT node listens on; all interfaces by default, "
        "since its visible addresses are what joining nodes bootstrap from",
    )
    initial_peers: list[str] = Field(
        [], description="multiaddrs of DHT peers to join; empty = start a new DHT"
    )
    events: Path | None = Field(None, description="JSON-lines file of events (ready, moves)")
    record_ttl_s: float = Field(
        5.0,
        gt=0,
        description="the TTL nodes announce their records with (a node's --record-ttl, 5 s "
        "by default); a Leave's tombstone must outlive it",
    )
    placeholder_ttl_s: float = Field(
        5.0,
        gt=0,
        description="how long a joiner's placeholder record spreads later joins; at most "
        "record_ttl_s: the DHT keeps whichever value expires last, so a longer placeholder "
        "would hide the node's own record until it expires",
    )
    manifest_ttl_s: float = Field(600.0, ge=30, description="refreshed every third of it")
    rebalance_every_s: float = Field(30.0, ge=0, description="seconds between checks; 0 = off")
    imbalance: float = Field(2.0, gt=1, description="strongest/weakest capacity that triggers")
    min_gain: float = Field(1.2, ge=1, description="a move must raise the bottleneck this much")
    move_ttl_s: float = Field(
        120.0, gt=0, description="how long a move request lives; no new move while one is open"
    )
    dht_timeout_s: float = Field(10.0, gt=0, description="deadline of every DHT read and write")
    identity_file: Path | None = Field(
        None,
        description="the coordinator's Ed25519 key (made, mode 0600, if missing): it seals the "
        "manifest and move requests, and nodes pin its id at Join. Default: a fresh key each "
        "start (nodes that joined before a restart then ignore its moves)",
    )
    http_listen: str | None = Field(
        None, description="HOST:PORT of the status web page and /metrics; unset = off"
    )
    security: SecurityConfig = SecurityConfig()
    ops: OpsConfig = OpsConfig()

    @field_validator("http_listen")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        return check_host_port(v)

    @field_validator("swarm")
    @classmethod
    def _swarm(cls, v: str) -> str:
        if not SWARM_ID.match(v):
            raise ValueError(f"swarm id {v!r}: use 1-64 of a-z 0-9 . _ - (lower case)")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if not HOST_PORT.match(v) or not 0 <= int(v.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v

    @field_validator("dht_listen", "initial_peers")
    @classmethod
    def _maddrs(cls, v: list[str]) -> list[str]:
        return check_multiaddrs(v)

    @model_validator(mode="after")
    def _coherent(self) -> CoordinatorConfig:
        if self.model.n_stages < 2:
            raise ValueError("a swarm needs n_stages >= 2 (--stages)")
        if self.ops.metrics_listen is not None:
            raise ValueError("the coordinator serves /metrics on http_listen (--http-listen)")
        if not self.dht_listen:
            raise ValueError("dht_listen needs at least one multiaddr (--dht-listen)")
        if self.placeholder_ttl_s > self.record_ttl_s:
            # the DHT keeps whichever value expires last: a placeholder outliving the node's
            # first real record would hide that record
            raise ValueError(
                f"placeholder_ttl_s ({self.placeholder_ttl_s}) must not exceed record_ttl_s "
                f"({self.record_ttl_s})"
            )
        return self


_LIST = {"nargs": "+", "metavar": "MULTIADDR"}

# dotted setting -> (flag, argparse kwargs), as NODE_FLAGS. `threads` is left out: no compute.
COORDINATOR_FLAGS: dict[str, tuple[str, dict]] = {
    **{k: v for k, v in MODEL_FLAGS.items() if k not in ("threads", *DEVICE_FLAGS)},
    "swarm": ("swarm", {"metavar": "ID", "help": "swarm id (default local)"}),
    **{k: TRAIN_FLAGS[k] for k in ("schedule", "overlap", "predict_weights", "predict_scale")},
    "data_source": (
        "data-source",
        {
            "metavar": "SOURCE",
            "help": "where joiners of stage 0 and the last stage fetch --data: a local path, "
            "https://.../DIR or hf://datasets/ORG/NAME@REVISION (docs/data.md)",
        },
    ),
    "wire_codec": (
        "wire-codec",
        {
            "choices": [c.value for c in WireCodec],
            "help": "boundary tensor codec (default int4-channel)",
        },
    ),
    "listen": ("listen", {"metavar": "HOST:PORT", "help": "gRPC address (default 0.0.0.0:0)"}),
    "dht_listen": ("dht-listen", {**_LIST, "help": "DHT listen multiaddrs"}),
    "initial_peers": ("initial-peers", {**_LIST, "help": "DHT peers; none = a new DHT"}),
    "events": (
        "events",
        {"metavar": "PATH", "help": "write JSON-lines events here (ready: port, DHT addrs)"},
    ),
    "record_ttl_s": (
        "record-ttl",
        {"type": float, "metavar": "S", "help": "TTL of node records, in seconds (default 5)"},
    ),
    "placeholder_ttl_s": (
        "placeholder-ttl",
        {"type": float, "metavar": "S", "help": "TTL of a joiner's placeholder (default 5)"},
    ),
    "rebalance_every_s": (
        "rebalance-every",
        {"type": float, "metavar": "S", "help": "seconds between checks; 0 = off (default 30)"},
    ),
    "imbalance": (
        "imbalance",
        {"type": float, "metavar": "X", "help": "capacity ratio that triggers (default 2)"},
    ),
    "min_gain": (
        "min-gain",
        {"type": float, "metavar": "X", "help": "bottleneck gain a move needs (default 1.2)"},
    ),
    "move_ttl_s": (
        "move-ttl",
        {"type": float, "metavar": "S", "help": "TTL of a move request (default 120)"},
    ),
    "identity_file": (
        "identity-file",
        {"metavar": "PATH", "help": "the coordinator's key; keep it across restarts"},
    ),
    "dht_timeout_s": (
        "dht-timeout",
        {"type": float, "metavar": "S", "help": "DHT call deadline, in seconds (default 10)"},
    ),
    "http_listen": (
        "http-listen",
        {"metavar": "HOST:PORT", "help": "serve the status page and /metrics here (default: off)"},
    ),
    **SECURITY_FLAGS,
    # its /metrics is served with the status page, on --http-listen
    **{k: v for k, v in OPS_FLAGS.items() if k != "ops.metrics_listen"},
}
