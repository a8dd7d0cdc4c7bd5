"""Multi-process, issue #5: a node SIGKILLed mid-run and restarted resumes from its checkpoint,
and `resbm export` turns a swarm's stage checkpoints into a model that `resbm sample` loads.

Real processes throughout: a coordinator and `resbm node` daemons (hivemind DHT, gRPC on
loopback), each in its own process group, all killed in `finally`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.events import read_events
from resbm.simulate import SimulateConfig, Swarm
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
TINY = {"d_model": 64, "n_heads": 2, "seq_len": 32, "compression": 16}
FROM_SCRATCH = math.log(256)  # the loss of an untrained model


def config(tmp_path, stages: int = 2, **over) -> SimulateConfig:
    base = {
        "model": {**TINY, "n_stages": stages, "n_layers": stages},
        "optim": {"lr": 1e-2, "warmup_steps": 0},  # learns within a few steps: a resumed
        "steps": 10,  # stage's loss is then clearly not a fresh init's
        "batch_size": 8,
        "microbatches": 2,
        "threads": 1,
        "workdir": tmp_path / "sim",
        "eval_batches": 1,
        "replicas": 1,
        "fixed_stages": True,
        "checkpoint_every": 2,
    }
    return SimulateConfig(**{**base, **over})


def events(p, kind: str) -> list[dict]:
    return [e for e in read_events(p.events) if e["event"] == kind]


@pytest.mark.parametrize(
    "victim,phase",
    [
        (1, "forward"),  # the last stage, after its first microbatch of the step
        (0, "backward"),  # stage 0, after stage 1 got (and counted) the step's microbatches
    ],
    ids=["last-stage", "first-stage"],
)
def test_a_stage_whose_only_node_is_sigkilled_resumes_from_its_checkpoint(tmp_path, victim, phase):
    """The only node of a stage SIGKILLs itself mid-step (fault injection: a real SIGKILL of its
    process group). The swarm pauses; the same node (same --identity-file and --checkpoint-dir, as
    systemd would restart it) comes back, loads the newest checkpoint the DHT announced for its
    stage, and the swarm finishes the run."""
    cfg = config(tmp_path)
    swarm = Swarm(cfg, cfg.workdir)
    launcher = swarm.launcher
    kill_at = 5  # the checkpoint of step 4 is the newest when it dies
    try:
        swarm.launch(overrides={victim: {"fail_at_step": kill_at, "fail_phase": phase}})
        dead = swarm.nodes[victim]
        dead.proc.wait(timeout=240)
        assert dead.proc.returncode == -signal.SIGKILL
        assert [e["step"] for e in events(dead, "killed")] == [kill_at]
        before = len(swarm.losses())
        assert before <= kill_at
        key = launcher.workdir / f"{dead.name}.key"
        again = launcher.start_node(swarm.node_config(victim, identity_file=key), wait=False)
        ok, error = swarm.supervise(timeout_s=240)
    finally:
        swarm.stop_all()
    result = swarm.result(ok, error)
    assert result["ok"], (result["error"], _logs(swarm))

    resumed = events(again, "resumed")
    assert len(resumed) == 1, _logs(swarm)
    assert resumed[0]["node"] == dead.ready["node"]  # the same key file: the same node id
    ckpt = resumed[0]["checkpoint"]
    assert ckpt == kill_at - 1 or ckpt == kill_at - 1 - cfg.checkpoint_every
    assert ckpt >= 2 and ckpt <= resumed[0]["step"] <= kill_at  # not from step 0
    # the run went on from there to the end: every step once, the last one --steps
    assert events(again, "exit")[0]["step"] == cfg.steps
    assert again.proc.returncode == 0
    others = [p for p in swarm.nodes if p is not dead and p is not again]
    assert [p.proc.returncode for p in others] == [0] * len(others)
    losses = result["loss_history"]
    assert len(losses) == cfg.steps and all(math.isfinite(x) for x in losses)
    # the resumed stage trained on from its checkpoint, not from a fresh init
    first = losses[resumed[0]["step"]]
    assert first < FROM_SCRATCH - 1.0
    assert abs(first - losses[ckpt]) < 0.5, losses  # the loss with the checkpointed weights


def _logs(swarm: Swarm) -> str:
    from resbm.launcher import tail

    return "\n".join(f"--- {p.name}:\n{tail(p.log, 40)}" for p in swarm.launcher.everyone())


# ---- a fixed pipeline (no DHT): `resbm node --resume` after a SIGKILL ------------------------
def fixed_node(tmp_path, stage: int, every: int, **over):
    from node.node_config import NodeConfig

    return NodeConfig(
        model={**TINY, "n_stages": 2, "n_layers": 2},
        optim={"lr": 1e-2, "warmup_steps": 0},
        steps=10,
        batch_size=8,
        microbatches=2,
        threads=1,
        wire_codec="fp32",
        listen="127.0.0.1:0",
        stage=stage,
        checkpoint_dir=tmp_path / f"ckpt{stage}",  # one per node, as on two machines
        checkpoint_every=every,
        **over,
    )


def ckpt_step(tmp_path, stage: int) -> int:
    from node.checkpoint import read_stage_meta

    return int(read_stage_meta(tmp_path / f"ckpt{stage}" / f"stage-{stage}.safetensors")["step"])


@pytest.mark.parametrize(
    "every0,every1",
    [(2, 2), (2, 4), (4, 2)],
    ids=["same-checkpoint", "upstream-newer", "downstream-newer"],
)
def test_a_fixed_pipeline_resumes_after_a_sigkill(tmp_path, every0, every1):
    """Stage 1 SIGKILLs itself mid-step 7; stage 0 fails too (its neighbour died mid-step) and
    writes no checkpoint on the way out. Both restart with --resume (as systemd would). With
    checkpoints of one step the run continues exactly as if uninterrupted; with checkpoints one
    interval apart (a node killed between its neighbour's save and its own; made certain here
    by different --checkpoint-every) stage 1 takes stage 0's step and the run still ends at
    --steps."""
    from node.trainer import ReferenceTrainer
    from resbm.launcher import Launcher

    launcher = Launcher(tmp_path / "run")
    try:
        s1 = launcher.start_node(
            fixed_node(tmp_path, 1, every1, fail_at_step=7, fail_phase="forward")
        )
        nxt = f"127.0.0.1:{s1.ready['port']}"
        s0 = launcher.start_node(fixed_node(tmp_path, 0, every0, next=nxt))
        assert s1.proc.wait(timeout=120) == -signal.SIGKILL
        assert s0.proc.wait(timeout=120) == 1  # a fixed pipeline cannot go on without it
        at = {0: ckpt_step(tmp_path, 0), 1: ckpt_step(tmp_path, 1)}
        assert at == {0: 7 // every0 * every0, 1: 7 // every1 * every1}

        r1 = launcher.start_node(fixed_node(tmp_path, 1, every1, resume=True))
        nxt = f"127.0.0.1:{r1.ready['port']}"
        r0 = launcher.start_node(fixed_node(tmp_path, 0, every0, next=nxt, resume=True))
        assert r0.proc.wait(timeout=120) == 0 and r1.proc.wait(timeout=120) == 0
    finally:
        launcher.kill_all()
    assert [r0.ready["step"], r1.ready["step"]] == [at[0], at[1]]  # resumed, not from 0
    assert events(r0, "exit")[0]["step"] == events(r1, "exit")[0]["step"] == 10
    steps = {e["step"]: e["loss"] for e in r1.steps()}
    assert sorted(steps) == list(range(at[0], 10))  # stage 0 holds the step count
    assert all(math.isfinite(x) and x < FROM_SCRATCH - 1.0 for x in steps.values())
    aligned = events(r1, "aligned")
    if at[0] == at[1]:
        assert not aligned
        from node.config import TrainConfig

        same = set(TrainConfig.model_fields) - {"checkpoint_dir", "checkpoint_every", "resume"}
        cfg = TrainConfig(**fixed_node(tmp_path, 0, every0).model_dump(include=same))
        ref = ReferenceTrainer(cfg, progress=False).run()["loss_history"]
        for t, loss in steps.items():  # exactly the uninterrupted run (an fp32 wire)
            assert loss == pytest.approx(ref[t], rel=1e-5), t
    else:
        assert [(e["resumed"], e["step"]) for e in aligned] == [(at[1], at[0])]


# ---- export + sample -------------------------------------------------------------------------
def resbm(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resbm.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def at_once(*argvs: list[str], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """`resbm` with each argv, run side by side."""
    with concurrent.futures.ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(lambda argv: resbm(*argv, timeout=timeout), argvs))


def test_export_a_running_swarm_and_a_simulated_one_then_sample(tmp_path):
    cfg = config(tmp_path, steps=10_000)  # runs until stopped
    swarm = Swarm(cfg, cfg.workdir)
    try:
        swarm.launch()
        wait_for(lambda: len(swarm.losses()) >= 4, timeout=180)
        peers = swarm.launcher.coordinator.ready["dht_maddrs"]
        export = ("export", "--initial-peers", *peers, "--checkpoint-dir", str(swarm.ckpt))
        ours = swarm.launcher.coordinator.ready["coordinator_id"]
        # four exports at once (each starts a DHT peer: in a row they took half the test)
        live, again, other, none = at_once(
            [*export, "--swarm", cfg.swarm, "--out", str(tmp_path / "live")],
            # pinned to the swarm's coordinator (#10 M1): the same; to another key: no manifest
            [*export, "--swarm", cfg.swarm, "--timeout", "10", "--coordinator-id", ours,
             "--out", str(tmp_path / "pinned")],
            [*export, "--swarm", cfg.swarm, "--timeout", "10", "--coordinator-id",
             "n-00000000000000000000", "--out", str(tmp_path / "other")],
            # a swarm nobody runs is a clear error
            [*export, "--swarm", "nope", "--out", str(tmp_path / "none"), "--timeout", "5"],
        )  # fmt: skip
        assert live.returncode == 0, live.stderr
        info = json.loads((tmp_path / "live" / "export.json").read_text())
        assert info["swarm"] == cfg.swarm and len(info["stages"]) == 2
        assert all(s["step"] >= 2 and s["step"] % 2 == 0 for s in info["stages"])
        assert {s["node"] for s in info["stages"]} == {p.ready["node"] for p in swarm.nodes}
        assert again.returncode == 0, again.stderr
        assert other.returncode == 2 and "no swarm" in other.stderr, other.stderr
        assert none.returncode == 2 and "no swarm 'nope'" in none.stderr
    finally:
        swarm.stop_all()
    stopped_at = max(e["step"] for p in swarm.nodes for e in events(p, "exit"))

    out = tmp_path / "model"
    done = resbm("export", "--checkpoint-dir", str(swarm.ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "export.json").read_text())
    assert [s["step"] for s in info["stages"]] == [stopped_at, stopped_at]
    text = resbm("sample", "--checkpoint-dir", str(out), "--prompt", "ROMEO:", "--tokens", "40")
    assert text.returncode == 0, text.stderr
    assert len(text.stdout.strip()) > len("ROMEO:") and f"step {stopped_at}" in text.stderr

    # one stage's file gone: export says which, and writes nothing
    only = tmp_path / "only-stage-0"
    only.mkdir()
    (only / "stage-0.safetensors").write_bytes((swarm.ckpt / "stage-0.safetensors").read_bytes())
    missing = resbm("export", "--checkpoint-dir", str(only), "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2 and "stage 1 of 2 is missing" in missing.stderr
    assert not (tmp_path / "bad").exists()
