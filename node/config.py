"""The reference trainer's config (`resbm train`), and the flags that set it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node.model.config import ModelConfig, OptimSettings
from node.model.presets import PRESETS, PresetName, fill_from_preset
from node.settings import ENV_NESTED, ENV_PREFIX
from node.wire.kinds import MAX_MICROBATCHES, WireCodec

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"  # checked again, against the hardware, at start


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="forbid"
    )

    model: ModelConfig = ModelConfig()
    # a named size (node/model/presets.py): fills the model settings not given explicitly
    preset: PresetName | None = Field(None, description="model size preset; explicit wins")

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: object) -> object:
        return fill_from_preset(data)

    optim: OptimSettings = OptimSettings()
    steps: int = Field(800, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per microbatch")
    microbatches: int = Field(
        1, ge=1, le=MAX_MICROBATCHES, description="microbatches per optimizer step"
    )
    seed: int = Field(0, ge=0)
    data: Path | None = Field(
        None, description="text file or prepared shard folder; default: bundled tiny shakespeare"
    )
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at end")
    resume: bool = False
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")
    eval_every: int = Field(100, ge=0, description="steps between val evaluations; 0 = at end")
    eval_batches: int = Field(8, ge=1)
    # where and how a stage computes (node/device.py); the precision is part of a swarm's
    # manifest (replicas must agree), the device is each node's own
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN, description="auto (CUDA if present), cpu, cuda[:N], mps"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast with fp32 master weights and optimizer state"
    )
    compile: bool = Field(False, description="torch.compile each block of the stage")
    # what crosses a boundary: a swarm always trains on what its wire codec delivers; with
    # `qat` the reference trainer does too (the codec's quantizer on z and dL/dz, gradients
    # passed straight through), so `resbm train` models a lossy wire exactly
    wire_codec: WireCodec = Field(WireCodec.fp32, description="boundary tensor codec")
    qat: bool = Field(False, description="train through the wire codec's quantizer")
    # the update rule across steps (node/trainer.py, node/protocol/schedule.py): 1f1b applies
    # each step's gradient to the weights it was computed at; overlapped starts step t+1's
    # first `overlap` microbatches before step t's update, at the weights before it, so a
    # pipeline need not drain between steps
    schedule: Literal["1f1b", "overlapped"] = Field(
        "1f1b", description="1f1b: exact, drains each step; overlapped: see node/trainer.py"
    )
    overlap: int | None = Field(
        None,
        ge=0,
        le=MAX_MICROBATCHES,
        description="overlapped: microbatches of each step run before the last step's update "
        "(default: all of them, PipeDream-2BW)",
    )
    predict_weights: bool = Field(
        True,
        description="overlapped: those microbatches run at the weights before the update "
        "extrapolated along the update before it (weight prediction)",
    )
    predict_scale: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="overlapped, predict_weights: how far along that update (1 = all of it, "
        "SpecTrain's, the default; 0.5 was not shown to cost less or more: node/trainer.py)",
    )

    @model_validator(mode="after")
    def _derive(self) -> TrainConfig:
        if "total_steps" not in self.optim.model_fields_set:  # schedule spans the run
            self.optim = self.optim.model_copy(update={"total_steps": self.steps})
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir (--checkpoint-dir)")
        if self.overlap is not None and self.schedule != "overlapped":
            raise ValueError("overlap (--overlap) is a setting of --schedule overlapped")
        if self.overlap is not None and self.overlap > self.microbatches:
            raise ValueError(
                f"overlap ({self.overlap}, --overlap) is more than the step's microbatches "
                f"({self.microbatches}, --microbatches)"
            )
        vocab = data_vocab(self.data)
        if vocab is not None and "vocab_size" not in self.model.model_fields_set:
            self.model = self.model.model_copy(update={"vocab_size": vocab})
        elif vocab is None and not getattr(self, "swarm_data", None):
            vocab = 256  # a text file (or the bundled one): byte tokens
        if vocab is not None and self.model.vocab_size < vocab:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}, --vocab-size) is smaller than the "
                f"vocabulary of {self.data or 'the bundled corpus'} ({vocab}): leave "
                "--vocab-size out to take the data's"
            )
        return self

    @property
    def overlap_mbs(self) -> int:
        """Microbatches of each step that run at the weights before the last update."""
        if self.schedule != "overlapped":
            return 0
        return self.microbatches if self.overlap is None else self.overlap

    @property
    def prediction(self) -> float:
        """How far the early microbatches' weights are extrapolated along the last update (0:
        not at all). StageRuntime's `predict`."""
        return self.predict_scale if self.overlap_mbs and self.predict_weights else 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.microbatches * self.model.seq_len


def data_vocab(data: Path | None) -> int | None:
    """The vocabulary a prepared dataset was tokenized with (its manifest.json; no shard is
    read), which the model's embedding and head must cover; None for a text file (bytes: 256,
    the model's default) or a path that is checked, and refused by name, when the data loads."""
    if data is None or not (data.is_dir() or data.name == "manifest.json"):
        return None
    from node.shards import read_manifest

    directory = data if data.is_dir() else data.parent
    if not (directory / "manifest.json").is_file():
        return None
    return int(read_manifest(directory)["vocab_size"])


def _bool_flag(help_: str) -> dict:
    return {"action": argparse.BooleanOptionalAction, "help": help_}


# each machine's own: also on `resbm join`, whose training settings come from the manifest
DEVICE_FLAGS: dict[str, tuple[str, dict]] = {
    "device": (
        "device",
        {"help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps (default auto)"},
    ),
    "compile": ("compile", _bool_flag("torch.compile the stage's blocks (default off)")),
}

# dotted setting -> (flag, argparse kwargs). Shared by every command that trains a model.
MODEL_FLAGS: dict[str, tuple[str, dict]] = {
    "preset": (
        "model",
        {
            "choices": list(PRESETS),
            "help": "model size preset; flags like --n-layers win (default: tiny's sizes)",
        },
    ),
    "model.n_stages": ("stages", {"type": int, "help": "pipeline stages (default 2)"}),
    "model.n_layers": ("n-layers", {"type": int, "help": "transformer blocks (default 4)"}),
    "model.d_model": ("d-model", {"type": int, "help": "residual width d (default 256)"}),
    "model.n_heads": ("n-heads", {"type": int, "help": "attention heads (default 4)"}),
    "model.vocab_size": ("vocab-size", {"type": int, "help": "vocabulary (default: the data's)"}),
    "model.seq_len": ("seq-len", {"type": int, "help": "context length (default 128)"}),
    "model.compression": ("compression", {"type": int, "help": "d/b; 1 = none (default 32)"}),
    "model.identity_path": ("identity-path", _bool_flag("keep the J_b skip (default on)")),
    "model.encoder": (
        "encoder",
        {"choices": ["mlp", "fused", "iota"], "help": "E/D form: mlp, fused or iota (default mlp)"},
    ),
    "model.encoder_hidden": (
        "encoder-hidden",
        {"type": int, "help": "E/D width; 0 = d (default 0)"},
    ),
    "model.decoder_init": (
        "decoder-init",
        {"choices": ["fan_in", "small"], "help": "D's init: 1/sqrt(b) or 0.02 (default fan_in)"},
    ),
    "model.boundary_norm": (
        "boundary-norm",
        _bool_flag("send z at unit RMS; the receiver rescales it with a learned gain (default on)"),
    ),
    "model.reembed": (
        "reembed",
        _bool_flag(
            "beyond the paper: every stage re-embeds its tokens (every stage needs data; "
            "default off)"
        ),
    ),
    "qat": ("qat", _bool_flag("train through the wire codec's quantizer (z, dL/dz; default off)")),
    "optim.name": ("optimizer", {"choices": ["muon", "adamw"], "help": "default muon"}),
    "optim.lr": ("lr", {"type": float, "help": "peak learning rate (default 3e-3)"}),
    "optim.weight_decay": (
        "weight-decay",
        {"type": float, "help": "decoupled weight decay (default 0)"},
    ),
    "optim.warmup_steps": ("warmup", {"type": int, "help": "warmup steps (default 20)"}),
    "optim.boundary_lr_scale": (
        "boundary-lr-scale",
        {"type": float, "help": "E/D learning rate, as a multiple of --lr (default 1)"},
    ),
    "optim.grad_clip": (
        "grad-clip",
        {"type": float, "help": "per-stage gradient norm clip; 0 = off (default 1)"},
    ),
    "steps": ("steps", {"type": int, "help": "optimizer steps (default 800)"}),
    "batch_size": ("batch-size", {"type": int, "help": "sequences per microbatch (default 16)"}),
    "microbatches": ("microbatches", {"type": int, "help": "microbatches per step (default 1)"}),
    "seed": ("seed", {"type": int, "help": "seed of the weights and the data order (default 0)"}),
    "data": (
        "data",
        {
            "metavar": "PATH",
            "help": "a text file, or a folder from `resbm data prepare` "
            "(default: tiny shakespeare)",
        },
    ),
    "threads": ("threads", {"type": int, "help": "torch threads; 0 = torch's choice (default 0)"}),
    **DEVICE_FLAGS,
    "precision": (
        "precision",
        {"choices": ["fp32", "bf16"], "help": "bf16: autocast, fp32 master weights (default fp32)"},
    ),
}

TRAIN_FLAGS: dict[str, tuple[str, dict]] = {
    **MODEL_FLAGS,
    "wire_codec": (
        "wire-codec",
        {
            "choices": [c.value for c in WireCodec],
            "help": "the codec --qat trains through (default fp32: no quantization)",
        },
    ),
    "checkpoint_dir": (
        "checkpoint-dir",
        {"metavar": "DIR", "help": "where stage checkpoints go (default: none)"},
    ),
    "checkpoint_every": (
        "checkpoint-every",
        {"type": int, "help": "steps between checkpoints; 0 = at the end"},
    ),
    "schedule": (
        "schedule",
        {
            "choices": ["1f1b", "overlapped"],
            "help": "1f1b: each step's gradient applied to the weights it was computed at "
            "(default); overlapped: the next step starts before the update (node/trainer.py)",
        },
    ),
    "overlap": (
        "overlap",
        {
            "type": int,
            "metavar": "N",
            "help": "overlapped: microbatches of a step run before the last step's update "
            "(default: all)",
        },
    ),
    "predict_weights": (
        "predict-weights",
        _bool_flag("overlapped: run them at the weights extrapolated by the last update (on)"),
    ),
    "predict_scale": (
        "predict-scale",
        {"type": float, "metavar": "A", "help": "overlapped: how far along it, 0-1 (1)"},
    ),
    "resume": ("resume", _bool_flag("continue from --checkpoint-dir (default off)")),
    "eval_every": ("eval-every", {"type": int, "help": "steps between evals; 0 = at the end"}),
    "eval_batches": ("eval-batches", {"type": int, "help": "batches per validation eval"}),
}
