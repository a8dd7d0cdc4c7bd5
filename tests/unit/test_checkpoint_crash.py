"""Checkpoints survive a crash of their writer, and the process log goes to a rotating file.

A real crash: a child process saves a stage's checkpoint in a loop and is SIGKILLed (at random
moments, and once deterministically between writing its temp file and renaming it). Afterwards
the newest checkpoint loads and is complete (every tensor holds the step it was saved at), it is
at least as new as the last save the child finished, and a killed writer's temp file is never
read as a checkpoint and is removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.logs import setup_logging
from node import checkpoint
from node.data import Batches, Corpus
from node.model.config import ModelConfig, OptimSettings
from node.model.resbm import ResBM
from node.runtime import StageRuntime

ROOT = Path(__file__).resolve().parents[2]
# big enough (~13 MB with the optimizer's momentum) that a save takes a while: a random kill
# usually lands inside one
MODEL = dict(d_model=256, n_heads=2, n_layers=4, n_stages=2, seq_len=16, compression=128)


def make_runtime() -> StageRuntime:
    cfg = ModelConfig(**MODEL)
    batches = Batches(Corpus.load(None), cfg.seq_len, 2, 0)
    stage = ResBM(cfg).stage(0)
    runtime = StageRuntime(stage, OptimSettings(), batches, 1)
    for p in stage.parameters():  # one optimizer step: the optimizer has state tensors to save
        p.grad = torch.ones_like(p)
    for opt in runtime.optimizers:
        opt.step()
    return runtime


def fill(runtime: StageRuntime, value: float) -> None:
    with torch.no_grad():
        for p in runtime.stage.parameters():
            p.fill_(value)
        for opt in runtime.optimizers:
            for state in opt.state.values():
                for t in state.values():
                    if torch.is_tensor(t) and t.is_floating_point():
                        t.fill_(value)


def child(directory: str, start: int, stall: bool) -> None:
    """The writer: saves step start, start+1, ... with every tensor set to the step, saying
    `saving N` before and `saved N` after each save. `stall`: stop for good between writing
    the temp file and renaming it (the parent kills it there)."""
    torch.set_num_threads(1)
    runtime = make_runtime()
    if stall:
        real = checkpoint.save_file

        def stalled(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            print(f"stalled {filename}", flush=True)
            threading.Event().wait()

        checkpoint.save_file = stalled
    step = start
    while True:
        fill(runtime, float(step))
        print(f"saving {step}", flush=True)
        checkpoint.save_stage(directory, runtime, step)
        print(f"saved {step}", flush=True)
        step += 1


def spawn(directory: Path, start: int, stall: bool = False):
    code = "import sys; from tests.unit.test_checkpoint_crash import child; "
    code += f"child({str(directory)!r}, {start}, {stall})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True
    ).start()
    return proc, lines


def read_until(lines: queue.Queue, prefix: str, seen: list[str], timeout: float = 60) -> str:
    while True:
        line = lines.get(timeout=timeout)
        seen.append(line)
        if line.startswith(prefix):
            return line


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def check_complete(directory: Path) -> int:
    """The newest checkpoint loads into a fresh stage and every tensor is from one save."""
    runtime = make_runtime()
    fill(runtime, -1.0)
    step = checkpoint.load_stage(directory, runtime)
    for p in runtime.stage.parameters():
        assert torch.all(p == step)
    states = [t for opt in runtime.optimizers for s in opt.state.values() for t in s.values()]
    floats = [t for t in states if torch.is_tensor(t) and t.is_floating_point()]
    assert floats and all(torch.all(t == step) for t in floats)
    return step


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def test_sigkill_during_checkpoint_writes_never_corrupts_the_last_good_one(tmp_path):
    ck, rng = tmp_path / "ck", random.Random(0)
    start, procs = 0, []
    try:
        for _ in range(4):
            proc, lines = spawn(ck, start)
            procs.append(proc)
            seen: list[str] = []
            read_until(lines, "saved", seen)  # at least one save of this writer finished
            threading.Event().wait(rng.uniform(0.0, 0.4))
            kill(proc)
            while not lines.empty():
                seen.append(lines.get())
            last_saved = max(int(x.split()[1]) for x in seen if x.startswith("saved"))
            last_started = max(int(x.split()[1]) for x in seen if x.startswith("saving"))
            step = check_complete(ck)
            assert last_saved <= step <= last_started
            names = {p.name for p in ck.iterdir() if not p.name.startswith(".")}
            # the newest generation and the one before (only that one if the kill came between
            # the two renames); stage 0 holds the data: `resbm sample` decodes with tokenizer
            assert names - {"stage-0.safetensors"} == {
                "stage-0.previous.safetensors",
                "tokenizer.json",
            }
            start = step + 1

        # the worst moment, for certain: the temp file is written, the rename not done yet
        proc, lines = spawn(ck, start, stall=True)
        procs.append(proc)
        line = read_until(lines, "stalled", [])
        kill(proc)
        stray = Path(line.split(" ", 1)[1])
        assert stray.is_file() and stray in temp_files(ck)
        assert check_complete(ck) == start - 1  # the stray is not mistaken for a checkpoint
        # the next writer (this process) removes what the dead one left
        runtime = make_runtime()
        fill(runtime, float(start))
        checkpoint.save_stage(ck, runtime, start)
        assert temp_files(ck) == []
        assert check_complete(ck) == start
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    """Replicas of one stage may share a directory: only dead writers' leftovers go."""
    ck = tmp_path / "ck"
    ck.mkdir()
    live = ck / f".stage-0.safetensors.{os.getppid()}.tmp"  # our parent: alive
    live.write_bytes(b"being written")
    runtime = make_runtime()
    checkpoint.save_stage(ck, runtime, 3)
    assert live.is_file()
    assert saved_step(ck) == 3


def saved_step(directory: Path) -> int:
    return int(checkpoint.read_stage_meta(directory / "stage-0.safetensors")["step"])


# ---- logs ----------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    sys.excepthook = hook


def test_logs_go_to_a_rotating_file_once_however_often_set_up(tmp_path, restore_logging, capsys):
    log_file = tmp_path / "logs" / "node.log"
    setup_logging("INFO", "[n1] ", log_file)
    setup_logging("INFO", "[n1] ", log_file)  # again (a re-executed node): no second handlers
    logging.getLogger("node.test").info("hello %d", 1)
    logging.getLogger("node.test").debug("not at INFO")
    text = log_file.read_text()
    assert text.count("hello 1") == 1 and "[n1] INFO node.test: hello 1" in text
    assert "not at INFO" not in text
    assert capsys.readouterr().err.count("hello 1") == 1  # and the terminal, once

    rotating = [h for h in logging.getLogger().handlers if hasattr(h, "maxBytes")]
    assert len(rotating) == 1 and rotating[0].maxBytes > 0 and rotating[0].backupCount >= 2

    setup_logging("WARNING", "", log_file)  # the level is applied; the file is appended to
    logging.getLogger("node.test").info("quiet")
    logging.getLogger("node.test").warning("loud")
    text = log_file.read_text()
    assert "hello 1" in text and "loud" in text and "quiet" not in text

    setup_logging("INFO")  # no file any more: nothing else is written there
    logging.getLogger("node.test").warning("terminal only")
    assert "terminal only" not in log_file.read_text()


def test_a_log_file_that_cannot_be_opened_is_a_clear_error(tmp_path, restore_logging):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--log-file"):
        setup_logging("INFO", "", blocker / "node.log")


def test_a_node_process_logs_to_its_file(tmp_path):
    """`resbm node --log-file`: what it logs (here: why it gives up) lands in the file too."""
    log_file = tmp_path / "node.log"
    argv = [sys.executable, "-m", "resbm.cli", "node", "--stages", "2", "--n-layers", "2"]
    argv += ["--d-model", "64", "--n-heads", "2", "--seq-len", "16", "--compression", "16"]
    argv += ["--stage", "0", "--next", "127.0.0.1:9", "--connect-timeout", "1"]
    argv += ["--listen", "127.0.0.1:0", "--log-file", str(log_file)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    text = log_file.read_text()
    assert "[stage 0] ERROR" in text and "cannot reach stage 1" in text
    assert "cannot reach stage 1" in proc.stderr


# ---- export from local directories ---------------------------------------------------------
TINY = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 32, "compression": 16}


def train(directory: Path, steps: int, **model) -> Path:
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    cfg = TrainConfig(
        model={**TINY, **model},
        steps=steps,
        batch_size=2,
        eval_every=0,
        eval_batches=1,
        checkpoint_dir=directory,
    )
    ReferenceTrainer(cfg, progress=False).run()
    return directory


def export(capsys, *argv: str) -> tuple[int, str, str]:
    from resbm.cli import main

    code = main(["export", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_picks_the_newest_step_per_stage_and_writes_where_it_came_from(tmp_path, capsys):
    old, new = train(tmp_path / "old", 1), train(tmp_path / "new", 3)
    code, out, err = export(
        capsys, "--checkpoint-dir", str(old), str(new), "--out", str(tmp_path / "m")
    )
    assert code == 0, err
    assert "exported 2 stages" in out
    info = json.loads((tmp_path / "m" / "export.json").read_text())
    assert [(s["stage"], s["step"]) for s in info["stages"]] == [(0, 3), (1, 3)]
    assert all(s["source"].startswith(str(new.resolve())) for s in info["stages"])
    assert info["swarm"] is None and not info["steps_differ"] and info["model"]["d_model"] == 64
    _, step = checkpoint.load_model(tmp_path / "m")
    assert step == 3
    # an existing export is not overwritten by accident
    code, _, err = export(capsys, "--checkpoint-dir", str(new), "--out", str(tmp_path / "m"))
    assert code == 2 and "--force" in err


def test_export_refuses_a_missing_stage_and_mixed_models(tmp_path, capsys):
    one = train(tmp_path / "a", 1)
    (one / "stage-1.safetensors").unlink()
    code, _, err = export(capsys, "--checkpoint-dir", str(one), "--out", str(tmp_path / "m"))
    assert code == 2 and "stage 1 of 2 is missing" in err
    assert not (tmp_path / "m").exists()

    other = train(tmp_path / "b", 1, compression=8)
    code, _, err = export(
        capsys, "--checkpoint-dir", str(one), str(other), "--out", str(tmp_path / "m")
    )
    assert code == 2 and "different models" in err and "compression=8" in err


def test_export_warns_about_stages_at_different_steps_and_sample_still_loads(tmp_path, capsys):
    early, late = train(tmp_path / "early", 1), train(tmp_path / "late", 2)
    (early / "stage-1.safetensors").unlink()
    (late / "stage-0.safetensors").unlink()
    argv = ["--checkpoint-dir", str(early), str(late), "--out", str(tmp_path / "m")]
    code, _, err = export(capsys, *argv)
    assert code == 0
    assert "stage 0 at step 1, stage 1 at step 2" in err
    assert json.loads((tmp_path / "m" / "export.json").read_text())["steps_differ"]
    _, step = checkpoint.load_model(tmp_path / "m")
    assert step == 1
    (tmp_path / "m" / "export.json").unlink()  # without the export's record: still an error
    with pytest.raises(ValueError, match="different steps"):
        checkpoint.load_model(tmp_path / "m")


def test_non_finite_weights_are_never_saved_and_a_bad_newest_file_falls_back(tmp_path):
    """#10 M6: one generation, overwritten without a check, then announced for recovery: one
    NaN (a poisoned round, a broken GPU) destroyed the last good checkpoint."""
    ck, runtime = tmp_path / "ck", make_runtime()
    for step in (1, 2):
        fill(runtime, float(step))
        checkpoint.save_stage(ck, runtime, step)
    fill(runtime, float("nan"))
    with pytest.raises(checkpoint.NotFinite, match="not finite"):
        checkpoint.save_stage(ck, runtime, 3)
    assert check_complete(ck) == 2  # the newest good one, untouched
    (ck / "stage-0.safetensors").write_bytes(b"a torn or tampered file")
    assert check_complete(ck) == 1  # the generation before it
    (ck / "stage-0.safetensors").unlink()  # a crash between a save's two renames
    assert check_complete(ck) == 1


def test_replicas_sharing_a_directory_save_the_same_step_at_once(tmp_path):
    """Replicas of one stage may share a checkpoint directory and save the same step together:
    the second one's move of the newest generation must not fail (review)."""
    ck, runtime = tmp_path / "ck", make_runtime()
    fill(runtime, 1.0)
    checkpoint.save_stage(ck, runtime, 1)
    real = os.replace

    def racing(src, dst):  # another replica moves the newest generation first
        if str(dst).endswith(".previous.safetensors") and Path(src).is_file():
            real(src, dst)
        real(src, dst)

    checkpoint.os.replace = racing
    try:
        fill(runtime, 2.0)
        checkpoint.save_stage(ck, runtime, 2)
    finally:
        checkpoint.os.replace = real
    assert check_complete(ck) == 2


def test_a_lagging_replica_does_not_replace_its_siblings_later_step(tmp_path, caplog):
    """Replicas of one stage may share a directory. One whose last round failed when its
    sibling's did not, and which was then stopped, saved one step behind over the sibling's
    file: the stages' files ended at different steps and the run could not be loaded (a flaky
    CI run of a kill test in tests/swarm/test_replicas.py)."""
    ck, runtime = tmp_path / "ck", make_runtime()
    fill(runtime, 6.0)
    checkpoint.save_stage(ck, runtime, 6)  # an older run's file, written before we started
    started = time.time()
    # a fresh run (not shared, or an older run's file): replaced, as before
    fill(runtime, 2.0)
    assert checkpoint.save_stage(ck, runtime, 2, shared_since=started) is not None
    assert check_complete(ck) == 2
    fill(runtime, 8.0)
    assert checkpoint.save_stage(ck, runtime, 8, shared_since=started) is not None  # a sibling
    fill(runtime, 7.0)
    with caplog.at_level("WARNING", logger="node.checkpoint"):
        assert checkpoint.save_stage(ck, runtime, 7, shared_since=started) is None
    assert check_complete(ck) == 8
    assert "saved step 8 since" in caplog.text
    assert checkpoint.read_stage_meta(ck / "stage-0.previous.safetensors")["step"] == "2"
    # a trainer or a fixed pipeline (no shared_since) replaces it as before
    assert checkpoint.save_stage(ck, runtime, 7) is not None
    assert check_complete(ck) == 7
    # another model's file is replaced too
    tensors, meta = checkpoint.stage_state(runtime, 9)
    save_file(tensors, str(ck / "stage-0.safetensors"), metadata={**meta, "model": "{}"})
    assert checkpoint.save_stage(ck, runtime, 7, shared_since=started) is not None
    assert check_complete(ck) == 7


def test_a_donors_optimizer_settings_are_not_taken(tmp_path):
    """#10 C2 (review): a state download loaded the donor's param groups whole: its lr_scale
    or betas changed every later update. Only the state tensors are taken."""
    donor, mine = make_runtime(), make_runtime()
    for opt in donor.optimizers:
        for group in opt.param_groups:
            group["lr_scale"] = 1000.0
    tensors, meta = checkpoint.stage_state(donor, 3)
    want = [[dict((k, v) for k, v in g.items() if k != "params") for g in o.param_groups]
            for o in mine.optimizers]  # fmt: skip
    assert checkpoint.load_stage_state(mine, tensors, meta) == 3
    got = [[dict((k, v) for k, v in g.items() if k != "params") for g in o.param_groups]
           for o in mine.optimizers]  # fmt: skip
    assert got == want
