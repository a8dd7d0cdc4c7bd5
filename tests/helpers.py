"""Small shared builders for tests (importable, unlike conftest)."""

from __future__ import annotations

import time

from node.model.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    """Smallest config that still has a 128x bottleneck (d=128 -> b=1)."""
    base = dict(d_model=128, n_heads=2, n_layers=3, n_stages=3, seq_len=16, compression=128)
    return ModelConfig(**{**base, **overrides})


def wait_for(pred, timeout: float = 120.0):
    """Poll `pred` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")
