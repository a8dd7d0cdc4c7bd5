"""`resbm join` as a user runs it: real coordinator, real `resbm join` processes with nothing but
where to find the swarm. The model, data and schedule come from the manifest; the data is a
prepared BPE dataset that stage 0 and the last stage fetch over HTTP from the manifest's
data_source (the middle stage never does); the last joiner cannot accept connections
(`--no-reachable`, as behind NAT), so every link it has is one it dialed upstream itself; all
train the run to its end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.identity import Identity
from coordinator.config import CoordinatorConfig
from node.events import read_events
from node.shards import bundled_corpus_path, data_info
from resbm.data_cmd import prepare
from resbm.launcher import Launcher
from tests.helpers import serve_directory

pytestmark = pytest.mark.swarm

SWARM = "join-test"
STEPS = 8


def coordinator_config(stages: int = 2, **over) -> CoordinatorConfig:
    return CoordinatorConfig(
        swarm=SWARM,
        model={
            "n_stages": stages,
            "n_layers": stages,
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
        **over,
    )


def join_argv(launcher: Launcher, name: str, *extra: str) -> list[str]:
    return [
        "--coordinator",
        launcher.coordinator_address,
        "--state-dir",
        str(launcher.workdir / name),
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",  # not join's fixed 7000: several joins share this machine
        "127.0.0.1:0",
        *extra,
    ]


@pytest.fixture
def served_dataset(tmp_path):
    """A BPE dataset prepared here and served by a static file server on 127.0.0.1, as a
    swarm's data_source would be; records every GET."""
    text = tmp_path / "corpus.txt"
    text.write_text(bundled_corpus_path().read_text()[:40_000])
    ds = tmp_path / "dataset"
    prepare([str(text)], "bpe:300", ds, shard_tokens=4_000, progress=False)
    with serve_directory(ds) as (url, gets):
        yield ds, url, gets


def test_join_takes_the_manifest_and_a_node_behind_nat_dials_out(tmp_path: Path, served_dataset):
    ds, url, gets = served_dataset
    fp = data_info(ds).fingerprint
    launcher = Launcher(tmp_path)
    try:
        launcher.start_coordinator(coordinator_config(3, data=ds, data_source=url))
        first = launcher.start_joiner(
            "first", join_argv(launcher, "first", "--listen", "127.0.0.1:0", "--wanted-stage", "0")
        )
        launcher.wait_ready(first)
        middle = launcher.start_joiner(
            "middle",
            join_argv(launcher, "middle", "--listen", "127.0.0.1:0", "--wanted-stage", "1"),
        )
        launcher.wait_ready(middle)
        nat = launcher.start_joiner(
            "nat", join_argv(launcher, "nat", "--no-reachable", "--wanted-stage", "2")
        )
        for p in (first, middle, nat):
            assert p.proc.wait(timeout=240) == 0, p.log.read_text()[-3000:]
    finally:
        launcher.kill_all()

    joiners = (first, middle, nat)
    ready = {
        p.name: next(e for e in read_events(p.events) if e["event"] == "ready") for p in joiners
    }
    stage_of = {name: e["stage"] for name, e in ready.items()}
    assert stage_of == {"first": 0, "middle": 1, "nat": 2}
    assert ready["nat"]["port"] == 0  # it never listened: nobody could have dialed it
    for p in joiners:
        steps = [e["step"] for e in read_events(p.events) if e["event"] == "step"]
        assert steps == list(range(STEPS)), p.name
    losses = [e["loss"] for e in read_events(nat.events) if e["event"] == "step"]
    # the last stage: the loss fell from ln(300), the prepared BPE's vocabulary
    assert losses[0] > losses[-1] and losses[0] == pytest.approx(math.log(300), abs=0.2)
    # the data: fetched (and verified) by stage 0 and the last stage only
    assert gets.count("/manifest.json") == 2, gets
    for name in ("first", "nat"):
        assert data_info(tmp_path / name / SWARM / "data" / fp).fingerprint == fp
    assert not (tmp_path / "middle" / SWARM / "data").exists()
    # what the joiner keeps between runs: its key (so its id), its stage, its checkpoints, its log
    home = tmp_path / "nat" / SWARM
    assert Identity.load(home / "identity.key").node_id == ready["nat"]["node"]
    assert (home / "stage").read_text().strip() == "2"
    assert (home / "checkpoints" / "stage-2.safetensors").is_file()
    assert (home / "checkpoints" / "tokenizer.json").is_file()  # `resbm sample` decodes with it
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
