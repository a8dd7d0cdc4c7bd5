"""Real nodes on loopback for a hostile peer to attack: the middle stage that
tests/loopback/test_node_inputs.py feeds (`node`), the last stage (`last_node`), and a real
coordinator on a real DHT (`running`, from tests/loopback/test_coordinator.py)."""

from __future__ import annotations

import pytest

from tests.loopback.test_coordinator import corpus_fp, dhts, running, swarm_id  # noqa: F401
from tests.loopback.test_node_inputs import MODEL, node, running_node  # noqa: F401  (fixture)


@pytest.fixture
async def last_node(tmp_path):
    async with running_node(tmp_path, MODEL["n_stages"] - 1) as n:
        yield n
