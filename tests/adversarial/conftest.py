"""Real nodes on loopback for a hostile peer to attack: the middle stage that
tests/loopback/test_node_inputs.py feeds (`node`), and the last stage (`last_node`)."""

from __future__ import annotations

import asyncio

import pytest

from node.daemon import StageNode
from node.node_config import NodeConfig
from tests.loopback.test_node_inputs import MODEL, B, node  # noqa: F401  (the fixture)


@pytest.fixture
async def last_node(tmp_path):
    cfg = NodeConfig(
        stage=MODEL["n_stages"] - 1,
        listen="127.0.0.1:0",
        model=MODEL,
        batch_size=B,
        microbatches=2,
        steps=100,
        wire_codec="fp32",
        events=tmp_path / "events.jsonl",
        threads=1,
        max_message_mb=0.25,
    )
    n = StageNode(cfg)
    task = asyncio.create_task(n.run())
    for _ in range(200):
        if n.port:
            break
        await asyncio.sleep(0.05)
    assert n.port, "node did not start"
    yield n
    n.request_stop()
    assert await asyncio.wait_for(task, 30) == 0
