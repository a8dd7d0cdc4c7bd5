"""`resbm bench prediction` (resbm/bench/prediction.py): the weight prediction's error against
its scale, on a tiny model. What it measures is only worth reading if the early weights it
builds are the run's own at the run's scale: checked bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from resbm.bench import prediction
from resbm.cli import build_parser

TINY = ["--stages", "3", "--d-model", "32", "--n-layers", "3", "--n-heads", "2"]
TINY += ["--seq-len", "16", "--batch-size", "2", "--microbatches", "4", "--compression", "4"]
TINY += ["--overlap", "2"]


def parse(*extra: str):
    return build_parser().parse_args(["bench", "prediction", *TINY, *extra])


def test_at_the_runs_own_scale_the_bench_rebuilds_its_early_weights_bit_for_bit():
    args = parse("--steps", "4", "--predict-scale", "0.5")
    trainer = prediction.trainer_for(args)
    history = prediction.History()
    for _ in range(3):
        history.step(trainer)
    before = history.before
    own = copy.deepcopy(trainer)
    own.accumulate(own.step)
    for rt in own.runtimes:
        rt.fold_early(own.step)
    want = [[p.grad for p in rt.stage.parameters()] for rt in own.runtimes]
    got = prediction.step_grads(trainer, trainer.cfg.prediction, before)
    assert trainer.cfg.prediction == 0.5
    assert all(torch.equal(a, b) for g, w in zip(got, want, strict=True)
               for a, b in zip(g, w, strict=True))  # fmt: skip
    other = prediction.step_grads(trainer, 1.0, before)
    assert not torch.equal(other[0][0], want[0][0])  # another scale: other early weights
    exact = prediction.step_grads(trainer, None, before)
    assert not torch.equal(exact[0][0], want[0][0])
    # the least-squares scale of the last update onto the next: no scale comes closer in
    # weights, and a = 0 misses by the whole update
    best = prediction.measure(trainer, [0.0, 1.0], before)["best_scale"]
    row = prediction.measure(trainer, [0.0, 1.0, *best], before)["weight_error"]
    for k, b in enumerate(best):
        assert row["0.0"][k] == pytest.approx(1.0)
        assert row[str(b)][k] <= min(row["0.0"][k], row["1.0"][k])


def test_the_bench_writes_each_points_errors_a_table_and_a_plot(tmp_path, capsys):
    out = tmp_path / "prediction.json"
    args = parse("--steps", "5", "--every", "2", "--scales", "0", "1", "--out", str(out))
    args.predict_scale = 0.0  # a run without prediction: its updates are the bench's own
    assert args.handler(args) == 0
    doc = json.loads(out.read_text())
    assert [p["step"] for p in doc["points"]] == [2, 4]
    for p in doc["points"]:
        assert set(p["grad_error"]) == {"0.0", "1.0"} and len(p["grad_error"]["0.0"]) == 3
        assert all(e > 0 for e in p["grad_error"]["0.0"][:2])  # stages with early microbatches
        assert len(p["best_scale"]) == 2  # the stages that run some early (not the last)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "best a" in capsys.readouterr().out
