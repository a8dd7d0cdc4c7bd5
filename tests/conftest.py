"""Shared fixtures. Tiers are marked by folder: unit/ (pure, in-process), loopback/ (real servers
on 127.0.0.1), swarm/ (real processes). Each tier has its own per-test timeout budget."""

from __future__ import annotations

import pytest
import torch

TIER_TIMEOUTS = {"unit": 120, "loopback": 120, "adversarial": 120, "swarm": 300}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier, seconds in TIER_TIMEOUTS.items():
            if f"/tests/{tier}/" in str(item.path):
                item.add_marker(getattr(pytest.mark, tier))
                if item.get_closest_marker("timeout") is None:
                    item.add_marker(pytest.mark.timeout(seconds))
    # the multi-process tier first: its tests are the long ones, and two workers (make test)
    # then end together instead of one finishing a long test alone
    items.sort(key=lambda item: "/tests/swarm/" not in str(item.path))


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2-core machines, often two at a time: keep torch from oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu(request, monkeypatch):
    """Every test but those marked `gpu` computes on the CPU, also on a machine with a GPU
    (`--device auto` would take it): exactness checks compare like with like. Node processes
    inherit the variable."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("RESBM_DEVICE", "cpu")
