"""`resbm simulate --link`: a swarm whose every inter-stage connection crosses an emulated WAN
link (real node processes, real proxies). The link must be invisible to training (an fp32
swarm still equals the reference trainer) and every boundary byte must cross it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.events import read_events
from node.trainer import ReferenceTrainer
from resbm.simulate import SimulateConfig, Swarm

pytestmark = pytest.mark.swarm
TINY = {"d_model": 64, "n_heads": 2, "seq_len": 32, "compression": 16}


def fp32_config(tmp_path, stages: int, **over) -> SimulateConfig:
    """An fp32 wire, so the swarm can be held to the reference trainer exactly."""
    return SimulateConfig(
        model={**TINY, "n_stages": stages, "n_layers": stages},
        batch_size=4,
        microbatches=2,
        threads=1,
        wire_codec="fp32",
        workdir=tmp_path / "sim",
        eval_batches=1,
        **over,
    )


def test_an_fp32_swarm_over_an_emulated_link_equals_the_reference(tmp_path):
    cfg = fp32_config(tmp_path, stages=3, steps=6, link="40mbit:15ms:3ms")
    result = Swarm(cfg, cfg.workdir).run(progress=False)
    assert result["ok"], result["error"]
    expected = ReferenceTrainer(cfg.train_config(), progress=False).run()
    for got, want in zip(result["loss_history"], expected["loss_history"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)

    link = result["link"]
    assert link["link"] == "40mbit:15ms:3ms" and link["severed"] == 0
    assert link["connections"] >= 2  # one per boundary: each through a proxy
    # every boundary byte crossed a proxy (which also carries gRPC's HTTP/2 framing)
    boundary = result["wire_bytes_forward"] + result["wire_bytes_backward"]
    assert link["bytes"]["up"] + link["bytes"]["down"] >= boundary > 0


def test_link_settings_are_checked_with_the_flag_named(tmp_path):
    base = {"model": {**TINY, "n_stages": 2, "n_layers": 2}, "workdir": tmp_path}
    with pytest.raises(ValueError, match=r"--link '80MBps:40ms'.*give bits, e\.g\. 640mbit"):
        SimulateConfig(**base, link="80MBps:40ms")  # bytes: refused, with the bits to give
    assert SimulateConfig(**base, link="80mbps:40ms").link is not None  # mbps = mbit
    with pytest.raises(ValueError, match="--sever"):
        SimulateConfig(**base, link="80mbit:40ms", sever=["later"])
    with pytest.raises(ValueError, match="give --link"):
        SimulateConfig(**base, sever=["10s"])
    assert SimulateConfig(**base, link="none").link is None  # the benchmark's "none"
    cli = [sys.executable, "-m", "resbm.cli", "simulate", "--link", "fast", "--steps", "1"]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--link 'fast'" in run.stderr


def test_a_severed_link_between_live_nodes_loses_nothing(tmp_path):
    """The link schedule resets every connection mid-run (a flap: both nodes stay alive, one
    replica a stage, so nobody else can take over). Each side holds the other a suspect (its DHT
    record stays), they relink, and each hands back to the *same* process what the cut lost
    (node/protocol/adoption.py's `redeliver`): nothing is lost or counted twice, so the run
    still equals the reference."""
    # a step is mostly time on the wire: the cut finds work in flight
    cfg = fp32_config(tmp_path, stages=2, steps=30, link="20mbit:100ms", sever=["3s:1s"])
    swarm = Swarm(cfg, cfg.workdir)
    try:  # bounded: a lost microbatch stalls the run rather than failing it
        swarm.launch()
        ok, error = swarm.supervise(timeout_s=150)
    finally:
        swarm.stop_all()
        swarm.wan.close()
    result = swarm.result(ok, error)
    assert result["ok"], result["error"]
    assert result["link"]["severed"] >= 1 and result["link"]["connections"] >= 2  # cut, relinked
    assert result["microbatches_lost"] == 0
    expected = ReferenceTrainer(cfg.train_config(), progress=False).run()
    for got, want in zip(result["loss_history"], expected["loss_history"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    events = [e for n in result["nodes"] for e in read_events(Path(n["log"]).with_suffix(".jsonl"))]
    # the cut happened mid-run, nobody was taken for dead, and each node got back what it held
    assert any(e["event"] == "link_lost" for e in events)
    assert not any(e["event"] == "peer_lost" for e in events)
    assert any(e["event"] == "adopted" and e["dead"] == e["node"] for e in events)
