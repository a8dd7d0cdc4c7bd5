"""The reference trainer end to end: learning, exact resume, checkpoints, sampling, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from node import checkpoint
from node.checkpoint import load_model
from node.config import TrainConfig
from node.sample import generate
from node.trainer import ReferenceTrainer

TINY = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 32, "compression": 16}


def tiny_train(**overrides) -> TrainConfig:
    base = {
        "model": TINY,
        "steps": 6,
        "batch_size": 4,
        "microbatches": 2,
        "eval_every": 0,
        "eval_batches": 2,
    }
    return TrainConfig(**{**base, **overrides})


def test_short_run_drives_loss_well_below_uniform():
    cfg = tiny_train(steps=60, batch_size=8, microbatches=1, optim={"lr": 1e-2})
    result = ReferenceTrainer(cfg, progress=False).run()
    assert result["loss_history"][0] > math.log(256) - 0.3
    assert result["val_loss"] < 0.65 * math.log(256), result["val_loss"]
    assert result["train_loss"] < 0.65 * math.log(256)


def test_resume_continues_exactly(tmp_path):
    schedule = {"total_steps": 8}
    straight_trainer = ReferenceTrainer(tiny_train(steps=8, optim=schedule), progress=False)
    straight = straight_trainer.run()

    ck = tmp_path / "ck"
    ReferenceTrainer(tiny_train(steps=4, optim=schedule, checkpoint_dir=ck), progress=False).run()
    resumed_trainer = ReferenceTrainer(
        tiny_train(steps=8, optim=schedule, checkpoint_dir=ck, resume=True), progress=False
    )
    assert resumed_trainer.step == 4
    resumed = resumed_trainer.run()
    assert resumed["loss_history"] == straight["loss_history"]  # bitwise, every step
    assert resumed["val_loss"] == straight["val_loss"]
    for (n, p), q in zip(
        resumed_trainer.model.named_parameters(), straight_trainer.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), n


def test_resume_refuses_another_model(tmp_path):
    ck = tmp_path / "ck"
    ReferenceTrainer(tiny_train(steps=1, checkpoint_dir=ck), progress=False).run()
    other = tiny_train(model={**TINY, "compression": 8}, checkpoint_dir=ck, resume=True)
    with pytest.raises(ValueError, match="another model config"):
        ReferenceTrainer(other, progress=False)


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    trainer = ReferenceTrainer(tiny_train(steps=2, checkpoint_dir=ck), progress=False)
    trainer.run()
    good = (ck / "stage-0.safetensors").read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_stage(ck, trainer.runtimes[0], 99)
    assert (ck / "stage-0.safetensors").read_bytes() == good
    assert sorted(p.name for p in ck.iterdir()) == [
        "run.json",
        "stage-0.safetensors",
        "stage-1.safetensors",
        "tokenizer.json",
    ]


def test_sample_loads_a_checkpoint_and_generates(tmp_path):
    ck = tmp_path / "ck"
    trainer = ReferenceTrainer(tiny_train(steps=3, checkpoint_dir=ck), progress=False)
    trainer.run()
    model, step = load_model(ck)
    assert step == 3
    for p, q in zip(model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p, q)
    text = generate(model, "ROMEO:", max_new_tokens=20, seed=1)
    assert text.startswith("ROMEO:") and len(text.encode()) >= 20
    assert generate(model, "ROMEO:", 20, seed=1) == text  # seeded


def _resbm(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "resbm.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        **kw,
    )


def test_cli_train_json_last_line_and_sample(tmp_path):
    ck = tmp_path / "ck"
    proc = _resbm(
        "train",
        "--steps",
        "3",
        "--d-model",
        "64",
        "--n-heads",
        "2",
        "--n-layers",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--compression",
        "16",
        "--checkpoint-dir",
        str(ck),
        "--threads",
        "1",
        "--json",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "steps",
        "tokens",
        "train_loss",
        "val_loss",
        "loss_history",
        "tokens_per_s",
        "params",
        "d_model",
        "boundary_dim",
        "compression",
        "optimizer",
    ):
        assert key in result, key
    assert result["steps"] == 3 and len(result["loss_history"]) == 3
    assert (result["d_model"], result["boundary_dim"], result["compression"]) == (64, 4, 16)
    assert result["tokens"] == 3 * 2 * 32

    proc = _resbm("sample", "--checkpoint-dir", str(ck), "--prompt", "KING", "--tokens", "10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("KING")


def test_cli_bad_setting_exits_2_and_names_it():
    proc = _resbm("train", "--compression", "7", "--steps", "1")
    assert proc.returncode == 2
    assert "compression (7) must divide d_model (256)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_subcommands():
    proc = _resbm("--help")
    assert proc.returncode == 0
    for cmd in ("train", "node", "simulate", "coordinator", "status", "sample", "bench"):
        assert cmd in proc.stdout


def test_cli_parsing_imports_no_torch_grpc_or_hivemind():
    """Processes fork hivemind's DHT before torch/gRPC exist; the CLI must not load them early."""
    code = (
        "import sys, resbm.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'grpc', 'hivemind') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_swarm_needs_two_stages():
    proc = _resbm("simulate", "--stages", "1", "--n-layers", "1", "--steps", "1")
    assert proc.returncode == 2 and "n_stages >= 2" in proc.stderr
