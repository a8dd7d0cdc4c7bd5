"""Observability of a real swarm: a `resbm coordinator` with --http-listen and two `resbm node`
processes with --metrics-listen (all port 0, found in their ready events) train a tiny model;
their /metrics move with training, and the coordinator's page, /api/status and `resbm status`
show the swarm and its loss curve. Every process is reaped (process groups) in `finally`."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import urllib.request

from resbm.simulate import SimulateConfig, Swarm
from tests.helpers import wait_for
from tests.loopback.test_metrics import one, parse_metrics

TINY = {"d_model": 64, "n_heads": 2, "seq_len": 16, "compression": 16}


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as resp:
        assert resp.status == 200
        return resp.read().decode()


def metrics(port: int) -> dict:
    return parse_metrics(get(port, "/metrics"))


def test_metrics_and_the_status_page_move_while_a_swarm_trains(tmp_path):
    cfg = SimulateConfig(
        model={**TINY, "n_stages": 2, "n_layers": 2},
        steps=1000,  # never reached: the test stops the swarm once it has seen enough
        batch_size=2,
        microbatches=2,
        threads=1,
        workdir=tmp_path / "sim",
    )
    swarm = Swarm(cfg, cfg.workdir)
    launcher = swarm.launcher
    try:
        web = swarm.coordinator_config().model_copy(update={"http_listen": "127.0.0.1:0"})
        coord = launcher.start_coordinator(web)
        ops = {"metrics_listen": "127.0.0.1:0"}
        nodes = [launcher.start_node(swarm.node_config(k, ops=ops), wait=False) for k in (0, 1)]
        for p in nodes:
            launcher.wait_ready(p)
        http = coord.ready["http_port"]
        port = {p.stage: p.ready["metrics_port"] for p in nodes}
        assert http and all(port.values())

        # nodes: counters move with training, the loss is a number
        wait_for(lambda: one(metrics(port[1]), "resbm_steps_total") >= 2, timeout=120)
        before = [metrics(port[k]) for k in (0, 1)]
        steps = one(before[1], "resbm_steps_total")
        wait_for(lambda: one(metrics(port[1]), "resbm_steps_total") >= steps + 3, timeout=120)
        after = [metrics(port[k]) for k in (0, 1)]
        for k in (0, 1):
            assert one(after[k], "resbm_steps_total") > one(before[k], "resbm_steps_total")
            assert one(after[k], "resbm_tokens_total") > one(before[k], "resbm_tokens_total")
        sent = [one(m[0], "resbm_bytes_sent_total", direction="forward") for m in (before, after)]
        got = [
            one(m[1], "resbm_bytes_received_total", direction="backward") for m in (before, after)
        ]
        assert sent[1] > sent[0] > 0 and got[1] == 0  # stage 1 sends dL/dz; receives no grads
        back = [one(m[1], "resbm_bytes_sent_total", direction="backward") for m in (before, after)]
        assert back[1] > back[0] > 0
        loss = one(after[1], "resbm_loss")
        assert math.isfinite(loss) and 0 < loss < 10
        assert one(after[0], "resbm_peers_linked", stage="1") == 1
        assert one(after[0], "resbm_wire_compression_ratio") > 4

        # the coordinator: its sampled loss curve, the page, the JSON, its metrics
        def history():
            data = json.loads(get(http, "/api/status"))
            return data if len(data["loss_history"]) >= 2 else None

        data = wait_for(history, timeout=60)
        ids = [p.ready["node"] for p in nodes]  # derived from each node's key
        assert [[r["node_id"] for r in s] for s in data["stages"]] == [[ids[0]], [ids[1]]]
        assert all(r["state"] == "online" for replicas in data["stages"] for r in replicas)
        assert data["current_step"] >= 2 and math.isfinite(data["recent_loss"])
        assert data["model_params"] > 0 and data["summary"]["stages"] == "2"
        page = get(http, "/")
        assert 'id="stage-0"' in page and 'id="stage-1"' in page
        assert f">{ids[0]}<" in page and f">{ids[1]}<" in page
        points = re.search(r'<svg[^>]*>.*<polyline [^>]*points="([^"]+)"', page, re.S)
        assert points is not None and len(points.group(1).split()) >= 2
        cm = metrics(http)
        assert one(cm, "resbm_coordinator_nodes", stage="1", state="online") == 1
        assert one(cm, "resbm_coordinator_joins_total") == 2
        assert one(cm, "resbm_coordinator_step") >= 2

        # `resbm status` in the terminal: the same map and a text loss curve
        grpc_address = f"127.0.0.1:{coord.ready['port']}"
        out = subprocess.run(
            [sys.executable, "-m", "resbm.cli", "status", "--coordinator", grpc_address],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert out.returncode == 0, out.stderr
        assert ids[0] in out.stdout and ids[1] in out.stdout
        curve = re.search(r"loss curve  ([▁▂▃▄▅▆▇█]+)", out.stdout)
        assert curve is not None and len(curve.group(1)) >= 2, out.stdout
    finally:
        launcher.stop_all(grace_s=30)
    assert not any(p.alive for p in launcher.everyone())
