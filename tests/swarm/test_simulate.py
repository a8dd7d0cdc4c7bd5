"""Multi-process: real `resbm node` processes on loopback against the reference trainer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from node.checkpoint import load_model
from node.events import read_events
from node.trainer import ReferenceTrainer
from node.wire.codec import itemsize
from resbm.simulate import SimulateConfig, Swarm
from tests.helpers import wait_for

TINY = {"d_model": 64, "n_heads": 2, "seq_len": 32, "compression": 16}


def sim_config(stages: int, tmp_path, **over) -> SimulateConfig:
    base = {
        "model": {**TINY, "n_stages": stages, "n_layers": stages},
        "steps": 20,
        "batch_size": 4,
        "microbatches": 3,
        "threads": 1,
        "wire_codec": "fp32",
        "workdir": tmp_path / "sim",
        "eval_batches": 2,
    }
    return SimulateConfig(**{**base, **over})


@pytest.mark.parametrize(
    "stages,over",
    [
        # CPU bf16 autocast: the mixed-precision path, through the compressed boundary
        (2, {"precision": "bf16", "steps": 12}),
        # every stage re-embeds its tokens (the middle one too, from its own copy of the data);
        # no compression: 32 KB tensors sent in chunks under a 20 KB message cap
        (
            3,
            {
                "model": {**TINY, "n_stages": 3, "n_layers": 3, "reembed": True, "compression": 1},
                "max_message_mb": 0.02,
                "steps": 5,
            },
        ),
        # a lossy wire, modelled by the reference trainer through the codec's quantizer
        (2, {"wire_codec": "bf16", "qat": True, "steps": 6}),
    ],
    ids=["2-stages-bf16-autocast", "3-stages-reembed-uncompressed-chunked", "bf16-wire-qat"],
)
def test_fp32_swarm_reproduces_the_reference_trainer(stages, over, tmp_path):
    cfg = sim_config(stages, tmp_path, **over)
    swarm = Swarm(cfg, cfg.workdir)
    result = swarm.run(progress=False)
    assert result["ok"], result["error"]

    ref = ReferenceTrainer(cfg.train_config(), progress=False)
    expected = ref.run()
    # every stage's gradient norm, every step: a scale error in one stage cannot hide behind
    # Muon's scale invariance and clipping
    norms = {(e["stage"], e["step"]): e["grad_norm"] for p in swarm.nodes for e in p.steps()}
    assert len(norms) == stages * cfg.steps
    for step, per_stage in enumerate(expected["grad_norm_history"]):
        for k, want in enumerate(per_stage):
            assert norms[(k, step)] == pytest.approx(want, rel=1e-5), (k, step)

    assert len(result["loss_history"]) == cfg.steps
    for got, want in zip(result["loss_history"], expected["loss_history"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    model, step = load_model(result["checkpoint_dir"])
    assert step == cfg.steps
    for (name, p), q in zip(model.named_parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    # fp32 at 16x: ~8x fewer bytes than a bf16 pipeline would send, framing included; the
    # uncompressed fp32 run (32 KB tensors in ~5 KB chunks) sends about twice the bf16 bytes
    expected_ratio = cfg.model.compression * 2 / itemsize(cfg.wire_codec)
    assert 0.75 * expected_ratio < result["wire_compression_vs_bf16"] < 1.02 * expected_ratio
    # the payload every boundary carries each step, framing on top
    m = cfg.model
    payload = cfg.steps * cfg.microbatches * cfg.batch_size * m.seq_len * (stages - 1)
    payload *= m.d_model // m.compression * itemsize(cfg.wire_codec)
    assert payload < result["wire_bytes_forward"] < 1.6 * payload
    assert result["wire_bytes_backward"] > 0
    assert all(n["exit_code"] == 0 for n in result["nodes"])
    assert (result["precision"], result["device"]) == (cfg.precision, "cpu")
    assert result["parameters"] == expected["parameters"]
    assert result["peak_memory_bytes"] > 0 and result["mfu"] is None


def _sessions() -> dict[int, int]:
    """pid -> session id of every live (non-zombie) process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if fields[0] != "Z":
                out[int(d)] = int(fields[3])  # state, ppid, pgrp, session
    return out


def test_killing_the_launcher_leaves_no_orphan_processes(tmp_path):
    """SIGKILL `resbm simulate`: its coordinator and nodes (and their DHT daemons and averager
    children, which live in the nodes' sessions) must all go."""
    workdir = tmp_path / "sim"
    argv = [sys.executable, "-m", "resbm.cli", "simulate", "--stages", "2", "--n-layers", "2"]
    argv += ["--d-model", "64", "--n-heads", "2", "--seq-len", "32", "--compression", "16"]
    argv += ["--steps", "100000", "--threads", "1", "--no-progress", "--workdir", str(workdir)]
    launcher = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    sessions: set[int] = set()
    try:

        def started():
            names = ["coordinator", "node0", "node1"]
            ready = [
                e["pid"]
                for n in names
                for e in read_events(workdir / f"{n}.jsonl")
                if e["event"] == "ready"
            ]
            return ready if len(ready) == 3 else None

        sessions.update(wait_for(started))
        wait_for(
            lambda: any(read_events(workdir / "node0.jsonl")[-1]["event"] == "step" for _ in [0])
        )
        assert sum(s in sessions for s in _sessions().values()) > 3  # the nodes' children too
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        wait_for(lambda: not any(s in sessions for s in _sessions().values()), timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid, sid in _sessions().items():
            if sid in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
