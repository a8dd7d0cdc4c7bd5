"""A node's Prometheus endpoint on loopback: two real stage nodes (a fixed pipeline, gRPC on
127.0.0.1) train in this process, each serving /metrics; the counters move with training, the
two ends of the link agree on the bytes, and the endpoint is gone once the node stops."""

from __future__ import annotations

import asyncio
import contextlib
import math

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.daemon import StageNode
from node.events import read_events
from node.node_config import NodeConfig

MODEL = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 16}
MODEL["compression"] = 16
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text -> {sample name: {sorted label items: value}}, by the reference parser
    (so a malformed exposition fails here)."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(metrics: dict, name: str, **labels) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


async def scrape(port: int) -> tuple[str, dict]:
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    return text, parse_metrics(text)


def config(tmp_path, stage: int, **over) -> NodeConfig:
    base = dict(
        stage=stage,
        listen="127.0.0.1:0",
        model=MODEL,
        batch_size=2,
        microbatches=2,
        steps=1000,
        threads=1,
        events=tmp_path / f"stage{stage}.jsonl",
        ops={"metrics_listen": "127.0.0.1:0"},
    )
    return NodeConfig(**{**base, **over})


async def wait_step(node: StageNode, step: int, tasks) -> None:
    for _ in range(1200):
        if node.step >= step:
            return
        for t in tasks:
            if t.done():
                pytest.fail(f"a node ended early: {t.result()}")
        await asyncio.sleep(0.05)
    pytest.fail(f"stage {node.k} not at step {step} in time (at {node.step})")


@pytest.fixture
async def pipeline(tmp_path):
    last = StageNode(config(tmp_path, 1))
    nodes, tasks = [last], [asyncio.create_task(last.run())]
    try:
        for _ in range(200):
            if last.port and last.metrics and last.metrics.port:
                break
            await asyncio.sleep(0.05)
        first = StageNode(config(tmp_path, 0, next=f"127.0.0.1:{last.port}"))
        nodes.append(first)
        tasks.append(asyncio.create_task(first.run()))
        yield first, last, tasks
    finally:
        await stop(nodes[::-1], tasks[::-1])


async def stop(nodes: list[StageNode], tasks: list) -> list[int]:
    """Stage 0 first, as launchers do: it finishes its step and leaves, then the last stage
    sees its neighbour gone (a stage that drains first would leave stage 0's step stalled)."""
    codes: list[int | None] = []
    for n, t in zip(nodes, tasks, strict=True):
        n.request_stop()
        done, _ = await asyncio.wait({t}, timeout=60)
        if not done:  # stuck: None in the codes, and a teardown that still completes
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        codes.append(t.result() if done and not t.cancelled() and not t.exception() else None)
    return codes


async def test_node_metrics_move_with_training_and_the_endpoint_closes(pipeline, tmp_path):
    first, last, tasks = pipeline
    await wait_step(last, 2, tasks)
    ports = [first.metrics.port, last.metrics.port]
    ready = [e for e in read_events(tmp_path / "stage1.jsonl") if e["event"] == "ready"]
    assert ready[0]["metrics_port"] == ports[1]  # how an operator finds a port-0 endpoint

    text, before = await scrape(ports[1])
    assert "# HELP resbm_steps_total" in text and "# TYPE resbm_steps_total counter" in text
    await wait_step(last, last.step + 2, tasks)
    _, after = await scrape(ports[1])
    _, up = await scrape(ports[0])

    assert one(after, "resbm_steps_total") >= one(before, "resbm_steps_total") + 2
    assert one(after, "resbm_tokens_total") > one(before, "resbm_tokens_total")
    assert one(after, "resbm_tokens_per_second") > 0
    assert math.isfinite(one(after, "resbm_loss")) and one(after, "resbm_loss") > 0
    assert "resbm_loss" not in up  # only the last stage computes the loss
    got = one(after, "resbm_bytes_received_total", direction="forward")
    assert got > one(before, "resbm_bytes_received_total", direction="forward")
    assert one(after, "resbm_bytes_sent_total", direction="backward") > 0
    assert one(up, "resbm_bytes_sent_total", direction="forward") > 0
    # 4 of 64 channels cross (16x), packed int4 on the wire (the default: 4x fewer bytes than
    # bf16): up to 64x fewer bytes, less framing and the per-channel scales of small tensors
    assert 16 < one(up, "resbm_wire_compression_ratio") < 64
    assert one(up, "resbm_peers_linked", stage="1") == 1
    assert one(after, "resbm_peers_linked", stage="0") == 1
    info = next(iter(after["resbm_node_info"]))
    assert dict(info)["node"] == last.node_id and dict(info)["stage"] == "1"
    assert one(after, "resbm_averaging_round_seconds_count") == 0  # no replicas, no rounds
    assert "resbm_errors_total" not in after  # nothing refused

    # both ends of the link count the same forward bytes (checked once both stopped)
    assert await stop([first, last], tasks[::-1]) == [0, 0]
    sent = sum(lk.bytes_sent["forward"] for lk in first.peers.links())
    received = sum(lk.bytes_received["forward"] for lk in last.peers.links())
    assert sent == received > 0
    for port in ports:  # the endpoint is closed with the node
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(port)


async def test_a_metrics_port_in_use_is_a_clear_start_error(tmp_path):
    first = StageNode(config(tmp_path, 1))
    task = asyncio.create_task(first.run())
    try:
        for _ in range(200):
            if first.metrics and first.metrics.port:
                break
            await asyncio.sleep(0.05)
        taken = f"127.0.0.1:{first.metrics.port}"
        second = StageNode(config(tmp_path, 0, ops={"metrics_listen": taken}))
        assert await asyncio.wait_for(second.run(), 30) == 1
        errors = [e for e in read_events(tmp_path / "stage0.jsonl") if e["event"] == "error"]
        assert "--metrics-listen" in errors[0]["message"] and taken in errors[0]["message"]
    finally:
        first.request_stop()
        await asyncio.wait_for(task, 30)
