"""A real `resbm simulate` process, stopped with Ctrl-C (SIGINT) mid-run: it says at once what
it starts and where it keeps its files (a new ./resbm-sim-<timestamp>), drains, reports
"stopped at step N; checkpoints in ..." with exit status 130 and no FAILED, and leaves
checkpoints of step N that `resbm sample` reads (the line the summary prints)."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.checkpoint import load_model
from node.events import read_events
from tests.helpers import wait_for

pytestmark = pytest.mark.swarm

# three stages: a middle stage drains too (it waits for stage 0's last step, then leaves)
TINY = ["--stages", "3", "--n-layers", "3", "--d-model", "64", "--n-heads", "2"]
TINY += ["--seq-len", "32", "--compression", "16", "--threads", "1", "--batch-size", "2"]


def steps_done(workdir: Path) -> int:
    n = 0
    for f in workdir.glob("node*.jsonl"):
        n = max(n, sum('"event": "step"' in line for line in f.read_text().splitlines()))
    return n


def test_ctrl_c_stops_cleanly_and_leaves_a_checkpoint_to_sample(tmp_path):
    err_log, out_log = tmp_path / "err.txt", tmp_path / "out.txt"
    with open(err_log, "w") as err, open(out_log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "resbm.cli", "simulate", *TINY, "--steps", "100000"],
            cwd=tmp_path,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # a test run in the background may have SIGINT ignored: the child must not
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        first = wait_for(lambda: err_log.read_text().splitlines()[:2], timeout=10)
        assert first[1] == "starting coordinator + 3 nodes..."
        workdir = tmp_path / re.search(r"checkpoints in (resbm-sim-[\d-]+)/", first[0]).group(1)
        wait_for(lambda: steps_done(workdir) >= 2, timeout=120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = out_log.read_text(), err_log.read_text()
    assert "FAILED" not in out + err and "Traceback" not in out + err
    assert "stopping: every node finishes its step" in err
    n = int(re.search(r"stopped at step (\d+); checkpoints in (\S+)", out).group(1))
    assert n >= 2
    ckpt = workdir / "ckpt"
    assert f"stopped at step {n}; checkpoints in {ckpt.relative_to(tmp_path)}" in out
    _, step = load_model(ckpt)
    assert step == n  # every stage drained to the same step and saved it
    exits = [e for f in workdir.glob("node*.jsonl") for e in read_events(f) if e["event"] == "exit"]
    assert len(exits) == 3 and all((e["code"], e["step"]) == (0, n) for e in exits), exits
    for log in workdir.glob("node*.log"):  # each left as asked, none crashed
        assert "Traceback" not in log.read_text()
    assert "stop requested: draining" in (workdir / "node0.log").read_text()

    sample = out.strip().splitlines()[-1].split(":  ", 1)[1]
    argv = shlex.split(sample)
    assert argv[:3] == ["resbm", "sample", "--checkpoint-dir"]
    got = subprocess.run(
        [sys.executable, "-m", "resbm.cli", *argv[1:], "--tokens", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("ROMEO:") and f"step {n}" in got.stderr
