"""Small shared builders for tests (importable, unlike conftest)."""

from __future__ import annotations

from node.model.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    """Smallest config that still has a 128x bottleneck (d=128 -> b=1)."""
    base = dict(d_model=128, n_heads=2, n_layers=3, n_stages=3, seq_len=16, compression=128)
    return ModelConfig(**{**base, **overrides})
