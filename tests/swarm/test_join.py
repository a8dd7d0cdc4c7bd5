"""`resbm join` as a user runs it: real coordinator, real `resbm join` processes with nothing but
where to find the swarm. The model, data and schedule come from the manifest; one joiner cannot
accept connections (`--no-reachable`, as behind NAT) and serves the stage *after* a reachable
one, so every link it has is one it dialed upstream itself; both train the run to its end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from node.events import read_events
from resbm.launcher import Launcher

pytestmark = pytest.mark.swarm

SWARM = "join-test"
STEPS = 8


def coordinator_config() -> CoordinatorConfig:
    return CoordinatorConfig(
        swarm=SWARM,
        model={
            "n_stages": 2,
            "n_layers": 2,
            "d_model": 64,
            "n_heads": 2,
            "seq_len": 16,
            "compression": 16,
        },
        steps=STEPS,
        batch_size=4,
        microbatches=2,
        listen="127.0.0.1:0",
        dht_listen=["/ip4/127.0.0.1/tcp/0"],
        rebalance_every_s=0,
    )


def join_argv(launcher: Launcher, name: str, *extra: str) -> list[str]:
    return [
        "--coordinator",
        launcher.coordinator_address,
        "--state-dir",
        str(launcher.workdir / name),
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        *extra,
    ]


def test_join_takes_the_manifest_and_a_node_behind_nat_dials_out(tmp_path: Path):
    launcher = Launcher(tmp_path)
    try:
        launcher.start_coordinator(coordinator_config())
        up = launcher.start_joiner(
            "reachable", join_argv(launcher, "reachable", "--listen", "127.0.0.1:0")
        )
        launcher.wait_ready(up)
        nat = launcher.start_joiner(
            "nat", join_argv(launcher, "nat", "--no-reachable", "--wanted-stage", "1")
        )
        for p in (up, nat):
            assert p.proc.wait(timeout=240) == 0, p.log.read_text()[-3000:]
    finally:
        launcher.kill_all()

    ready = {
        p.name: next(e for e in read_events(p.events) if e["event"] == "ready") for p in (up, nat)
    }
    stage_of = {name: e["stage"] for name, e in ready.items()}
    assert stage_of == {"reachable": 0, "nat": 1}
    assert ready["nat"]["port"] == 0  # it never listened: nobody could have dialed it
    for p in (up, nat):
        steps = [e["step"] for e in read_events(p.events) if e["event"] == "step"]
        assert steps == list(range(STEPS)), p.name
        if p.name == "nat":
            losses = [
                e["loss"] for e in read_events(p.events) if e["event"] == "step"
            ]  # the last stage: the loss fell from ln(256) as it trained
            assert losses[0] > losses[-1] and losses[0] == pytest.approx(5.55, abs=0.2)
    # what the joiner keeps between runs: its id, its stage, its checkpoints, its log
    home = tmp_path / "nat" / SWARM
    node_id = (home / "node-id").read_text().strip()
    assert node_id == ready["nat"]["node"]
    assert (home / "stage").read_text().strip() == "1"
    assert (home / "checkpoints" / "stage-1.safetensors").is_file()
    assert "linked with" in (home / "node.log").read_text()


def test_join_refuses_an_unknown_swarm_with_exit_2(tmp_path: Path):
    launcher = Launcher(tmp_path)
    try:
        launcher.start_coordinator(coordinator_config())
        peers = launcher.initial_peers()
        argv = [sys.executable, "-m", "resbm.cli", "join", "--swarm", "no-such-swarm"]
        argv += ["--initial-peers", *peers, "--state-dir", str(tmp_path / "x")]
        argv += ["--dht-listen", "/ip4/127.0.0.1/tcp/0"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        launcher.kill_all()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no swarm 'no-such-swarm' found" in out.stderr


def test_join_config_show_names_what_the_manifest_decides(tmp_path: Path):
    argv = [sys.executable, "-m", "resbm.cli", "config", "show", "join", "--json"]
    argv += ["--coordinator", "127.0.0.1:9", "--state-dir", str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["coordinator"] == "127.0.0.1:9" and data["state_dir"] == str(tmp_path)
