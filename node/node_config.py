"""`resbm node`'s config: one pipeline stage as a daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, model_validator

from node.config import MODEL_FLAGS, TrainConfig
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

    @model_validator(mode="after")
    def _stage_exists(self) -> NodeConfig:
        if self.model.n_stages < 2:
            raise ValueError("a pipeline needs n_stages >= 2 (--stages); `resbm train` runs one")
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
    "resume": (
        "resume",
        {"action": argparse.BooleanOptionalAction, "help": "continue from --checkpoint-dir"},
    ),
}
