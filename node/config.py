"""The reference trainer's config (`resbm train`), and the flags that set it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node.model.config import ModelConfig, OptimSettings
from node.settings import ENV_NESTED, ENV_PREFIX


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="forbid"
    )

    model: ModelConfig = ModelConfig()
    optim: OptimSettings = OptimSettings()
    steps: int = Field(800, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per microbatch")
    microbatches: int = Field(1, ge=1, description="microbatches per optimizer step")
    seed: int = Field(0, ge=0)
    data: Path | None = Field(None, description="text file; default: bundled tiny shakespeare")
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at end")
    resume: bool = False
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")
    eval_every: int = Field(100, ge=0, description="steps between val evaluations; 0 = at end")
    eval_batches: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _derive(self) -> TrainConfig:
        if "total_steps" not in self.optim.model_fields_set:  # schedule spans the run
            self.optim = self.optim.model_copy(update={"total_steps": self.steps})
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir (--checkpoint-dir)")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.microbatches * self.model.seq_len


def _bool_flag(help_: str) -> dict:
    return {"action": argparse.BooleanOptionalAction, "help": help_}


# dotted setting -> (flag, argparse kwargs). Shared by every command that trains a model.
MODEL_FLAGS: dict[str, tuple[str, dict]] = {
    "model.n_stages": ("stages", {"type": int, "help": "pipeline stages (default 2)"}),
    "model.n_layers": ("n-layers", {"type": int, "help": "transformer blocks (default 4)"}),
    "model.d_model": ("d-model", {"type": int, "help": "residual width d (default 256)"}),
    "model.n_heads": ("n-heads", {"type": int, "help": "attention heads (default 4)"}),
    "model.seq_len": ("seq-len", {"type": int, "help": "context length (default 128)"}),
    "model.compression": ("compression", {"type": int, "help": "d/b; 1 = none (default 128)"}),
    "model.identity_path": ("identity-path", _bool_flag("keep the J_b skip (default on)")),
    "model.encoder": ("encoder", {"choices": ["mlp", "fused"], "help": "E/D form"}),
    "model.encoder_hidden": ("encoder-hidden", {"type": int, "help": "E/D width; 0 = d"}),
    "model.decoder_init": ("decoder-init", {"choices": ["fan_in", "small"], "help": "D init"}),
    "optim.name": ("optimizer", {"choices": ["muon", "adamw"], "help": "default muon"}),
    "optim.lr": ("lr", {"type": float, "help": "peak learning rate (default 3e-3)"}),
    "optim.weight_decay": ("weight-decay", {"type": float}),
    "optim.warmup_steps": ("warmup", {"type": int, "help": "warmup steps (default 20)"}),
    "optim.boundary_lr_scale": ("boundary-lr-scale", {"type": float, "help": "E/D lr x"}),
    "optim.grad_clip": ("grad-clip", {"type": float, "help": "per-stage clip; 0 = off"}),
    "steps": ("steps", {"type": int, "help": "optimizer steps (default 800)"}),
    "batch_size": ("batch-size", {"type": int, "help": "sequences per microbatch (default 16)"}),
    "microbatches": ("microbatches", {"type": int, "help": "microbatches per step (default 1)"}),
    "seed": ("seed", {"type": int}),
    "data": ("data", {"help": "training text file (default: bundled tiny shakespeare)"}),
    "threads": ("threads", {"type": int, "help": "torch threads; 0 = default"}),
}

TRAIN_FLAGS: dict[str, tuple[str, dict]] = {
    **MODEL_FLAGS,
    "checkpoint_dir": ("checkpoint-dir", {"help": "where stage checkpoints go"}),
    "checkpoint_every": ("checkpoint-every", {"type": int, "help": "0 = only at the end"}),
    "resume": ("resume", _bool_flag("continue from --checkpoint-dir")),
    "eval_every": ("eval-every", {"type": int, "help": "0 = only at the end"}),
    "eval_batches": ("eval-batches", {"type": int}),
}
