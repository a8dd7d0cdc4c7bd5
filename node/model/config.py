"""The model's typed configuration.

One object describes the whole ResBM; every stage is cut from it, so two processes that hold
equal configs hold compatible stages. `fingerprint()` is what peers compare before they trade
tensors.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EncoderKind = Literal["mlp", "fused", "iota"]
OptimizerName = Literal["muon", "adamw"]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(256, ge=2, description="byte-level tokenizer: 256")
    n_layers: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8)
    n_heads: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=2, description="context length T")
    mlp_ratio: int = Field(4, ge=1)
    n_stages: int = Field(2, ge=1, description="pipeline stages = boundaries + 1")
    # The default boundary (since 0.5): 32x with 8 channels, sent as packed int4 at unit RMS:
    # the same ~4 bytes per token per boundary as 128x in bf16, and a third of its loss gap in
    # `resbm bench gap` (benchmarks/README.md). `--compression 128 --no-boundary-norm
    # --wire-codec bf16` is the paper's 128x boundary.
    compression: int = Field(
        32, ge=1, description="channel ratio d_model / b at every boundary; 1 = no bottleneck"
    )
    identity_path: bool = Field(True, description="the parameter-free J_b skip (the ablation)")
    encoder: EncoderKind = Field(
        "mlp",
        description="mlp: separate E/D MLPs; fused: E in the last block, D = ReLU(W z); iota: "
        "IOTA's form (SwiGLU E in the last block, ReLU(W z) feeds only the next first attention)",
    )
    encoder_hidden: int = Field(0, ge=0, description="E/D hidden width m; 0 = d_model")
    decoder_init: Literal["fan_in", "small"] = Field(
        "fan_in", description="init of D's b-input layer: 1/sqrt(b) (fan_in) or 0.02 (small)"
    )
    rope_base: float = Field(10000.0, gt=0)
    boundary_norm: bool = Field(
        True,
        description="send z at unit RMS (the encoder normalises it; the decoder rescales it "
        "with a learned per-channel gain)",
    )
    reembed: bool = Field(
        False,
        description="beyond the paper: every stage adds its own embedding of the microbatch's "
        "tokens to what it decodes (no wire bytes; every stage then needs the data)",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model / n_heads must be even (rotary embeddings rotate pairs)")
        if self.d_model % self.compression:
            fits = [c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256) if self.d_model % c == 0]
            raise ValueError(
                f"compression ({self.compression}) must divide d_model ({self.d_model}); "
                f"try one of {fits}"
            )
        if self.n_stages > self.n_layers:
            raise ValueError(
                f"n_stages ({self.n_stages}) cannot exceed n_layers ({self.n_layers}): "
                "every stage holds at least one block"
            )
        if self.reembed and self.bottleneck and self.encoder == "iota":
            raise ValueError(
                "reembed adds tokens to the decoded residual, which the iota encoder form "
                "never builds: use encoder mlp or fused with reembed"
            )
        return self

    def needs_tokens(self, stage: int) -> bool:
        """Whether stage `stage` reads the microbatch's tokens (and so needs the data): stage 0
        embeds them, the last stage derives its targets, and with `reembed` every stage does."""
        return stage in (0, self.n_stages - 1) or (self.reembed and self.n_stages > 1)

    @property
    def boundary_dim(self) -> int:
        """b: channels per token that cross a stage boundary."""
        return self.d_model // self.compression

    @property
    def bottleneck(self) -> bool:
        return self.compression > 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.encoder_hidden or self.d_model

    @property
    def swiglu_hidden(self) -> int:
        """The iota encoder's SwiGLU width: 2/3 of the GELU MLP's, so its three matrices hold
        what the MLP's two hold."""
        return 2 * self.mlp_ratio * self.d_model // 3

    def fingerprint(self) -> str:
        data = self.model_dump()
        if not self.reembed:  # added in 0.4: a config without it keeps its 0.4.0 fingerprint
            data.pop("reembed")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class OptimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: OptimizerName = "muon"
    lr: float = Field(3e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    total_steps: int = Field(800, ge=1, description="length of the cosine schedule")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="per-stage grad-norm clip; 0 = off")
    boundary_lr_scale: float = Field(1.0, gt=0, description="lr multiplier for E/D weights")
