"""`resbm coordinator` as a real process: it keeps nothing outside the DHT, so one that is SIGKILLed
and restarted against a surviving DHT peer (this test's own) rebuilds the swarm map; and one whose
config differs from the swarm's manifest refuses to start. Every coordinator runs in its own
process group (its DHT child and p2pd with it), killed in `finally`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.identity import Identity
from coordinator.client import CoordinatorUnavailable, join, join_in_subprocess, status
from coordinator.config import CoordinatorConfig
from coordinator.messages import JoinRequest
from coordinator.signing import sign
from node.data import Corpus
from node.events import read_events
from node.swarm.dht import SwarmDHT, start_dht, visible_maddrs
from node.swarm.manifest import manifest_for
from node.version import VERSION
from tests.helpers import key, nid

SWARM = "proc-test"
TINY = ["--stages", "2", "--n-layers", "2", "--d-model", "64", "--n-heads", "2"]
TINY += ["--seq-len", "16", "--compression", "16"]


@pytest.fixture(scope="module")
def dht():
    """The swarm's surviving DHT peer; created before any gRPC object of this process."""
    d = start_dht([])
    yield d
    d.shutdown()


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def launch(procs: list, workdir: Path, peers: list[str], *extra: str) -> tuple[Path, Path]:
    workdir.mkdir(parents=True)
    events, log = workdir / "events.jsonl", workdir / "log.txt"
    argv = [sys.executable, "-m", "resbm.cli", "coordinator", "--swarm", SWARM, *TINY]
    argv += ["--listen", "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0"]
    argv += ["--events", str(events), "--rebalance-every", "0", "--initial-peers", *peers]
    with open(log, "w") as out:
        procs.append(
            subprocess.Popen(
                [*argv, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
    return events, log


def wait_ready(proc: subprocess.Popen, events: Path, log: Path, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = [e for e in read_events(events) if e["event"] == "ready"]
        if ready:
            return ready[0]
        if proc.poll() is not None:
            pytest.fail(f"coordinator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"coordinator not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")


def request(name: str, fingerprint: str) -> JoinRequest:
    return sign(
        JoinRequest(nid(name), SWARM, VERSION, fingerprint, throughput=1.0), SWARM, key(name)
    )


def test_a_killed_coordinator_restarts_and_rebuilds_the_swarm_from_the_dht(dht, procs, tmp_path):
    peers = visible_maddrs(dht)
    # placeholders must outlive the restart: they are what the second coordinator rebuilds from
    # (its own: sealed by the key it keeps across the restart, #10 H6)
    ttl = ("--placeholder-ttl", "60", "--record-ttl", "60")
    ttl += ("--identity-file", str(tmp_path / "coordinator.key"))
    events, log = launch(procs, tmp_path / "first", peers, *ttl)
    ready = wait_ready(procs[0], events, log)
    assert ready["manifest"] == "stored" and ready["swarm"] == SWARM and ready["n_stages"] == 2
    address, fp = f"127.0.0.1:{ready['port']}", ready["fingerprint"]

    first = join_in_subprocess(address, request("n0", fp), timeout_s=20)  # how nodes join
    assert first.stage == 0 and first.initial_peers == ready["dht_maddrs"]
    assert first.manifest.fingerprint == fp and first.manifest.swarm == SWARM
    assert asyncio.run(join(address, request("n1", fp), 20)).stage == 1

    os.killpg(procs[0].pid, signal.SIGKILL)
    procs[0].wait(timeout=10)
    with pytest.raises(CoordinatorUnavailable):  # a join waits while none runs, then gives up
        asyncio.run(join(address, request("n2", fp), timeout_s=1))

    events, log = launch(procs, tmp_path / "second", peers, *ttl)
    again = wait_ready(procs[1], events, log)
    assert again["manifest"] == "found" and again["fingerprint"] == fp
    assert again["coordinator_id"] == ready["coordinator_id"] == first.coordinator_id
    address = f"127.0.0.1:{again['port']}"
    st = asyncio.run(status(address, 20))
    assert [[r.node_id for r in s] for s in st.stages] == [[nid("n0")], [nid("n1")]]
    assert st.manifest.fingerprint == fp
    assert asyncio.run(join(address, request("n2", fp), 20)).stage == 0  # what the first chose

    os.killpg(procs[1].pid, signal.SIGTERM)  # a clean stop
    assert procs[1].wait(timeout=60) == 0
    assert [e["event"] for e in read_events(events)][-1] == "exit"


def test_a_coordinator_whose_config_differs_from_the_swarm_refuses_to_start(dht, procs, tmp_path):
    tiny = {"n_stages": 2, "n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 16}
    theirs = CoordinatorConfig(
        swarm=SWARM + "-b", model={**tiny, "compression": 16, "encoder": "fused"}
    )
    manifest = manifest_for(theirs, Corpus.load(None).fingerprint, theirs.swarm)

    async def put() -> bool:
        return await SwarmDHT(dht, theirs.swarm, 10, Identity.generate()).put_manifest(
            manifest, 600
        )

    assert asyncio.run(put())
    events, log = launch(procs, tmp_path / "c", visible_maddrs(dht), "--swarm", theirs.swarm)
    assert procs[0].wait(timeout=120) == 2
    out = log.read_text()
    assert "model.encoder: swarm 'fused', yours 'mlp'" in out and "Traceback" not in out
    assert [e["event"] for e in read_events(events)] == ["error"]
