"""Benches measure afresh and write outside the committed results unless asked: every bench's
default is ./resbm-bench/NAME.json, `--save-results` is benchmarks/results/NAME.json, `--out`
anything; `bench convergence` retrains unless `--resume`, and replays only with `--replay`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from resbm.bench import RESULTS, RUNS, convergence, out_path
from resbm.cli import build_parser, main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

# bench -> (extra flags, the results file's name)
BENCHES = {
    "convergence": ([], "convergence"),
    "bandwidth": (["--quick"], "bandwidth-quick"),
    "churn": ([], "churn"),
    "codecs": ([], "codecs"),
    "overhead": ([], "overhead"),
    "replicas": ([], "replicas"),
    "device": ([], "device-cpu"),
}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_every_bench_writes_to_a_run_folder_unless_asked(bench):
    flags, name = BENCHES[bench]
    assert out_path(parse(bench, *flags), name) == RUNS / f"{name}.json"
    assert out_path(parse(bench, *flags, "--save-results"), name) == RESULTS / f"{name}.json"
    assert out_path(parse(bench, *flags, "--out", "x/y.json"), name) == Path("x/y.json")
    with pytest.raises(SystemExit):  # one or the other
        parse(bench, "--out", "x.json", "--save-results")


def fake_run(calls: list[dict]):
    def train_one(spec, threads, device="auto", precision="fp32"):
        calls.append(spec)
        return {
            **spec,
            "tokens": 1,
            "train_loss": 2.0,
            "val_loss": 2.0 + spec["compression"] / 1000,
            "val_history": [[spec["steps"], 2.0]],
            "loss_history": [2.0],
            "tokens_per_s": 1.0,
            "params": 1,
            "boundary_dim": spec["d_model"] // spec["compression"],
            "wire_bytes_ratio": float(spec["compression"]),
            "key": convergence.run_key(spec),
        }

    return train_one


def test_convergence_measures_afresh_by_default_and_resumes_when_asked(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    calls: list[dict] = []
    monkeypatch.setattr(convergence, "train_one", fake_run(calls))
    args = ["bench", "convergence", "--quick", "--stages", "2", "--no-plot"]

    assert main(args) == 0
    out = tmp_path / "resbm-bench" / "convergence-quick.json"
    assert len(calls) == 8 and len(json.loads(out.read_text())["runs"]) == 8
    assert "results to resbm-bench/convergence-quick.json" in capsys.readouterr().err
    assert not (tmp_path / "benchmarks").exists()  # nothing near the committed results

    assert main(args) == 0  # a second run trains again: no replay of the last one
    assert len(calls) == 16 and len(json.loads(out.read_text())["runs"]) == 8
    assert "(0 already in" in capsys.readouterr().err

    assert main([*args, "--resume"]) == 0  # explicitly: keep what is there
    assert len(calls) == 16
    assert "8 already in" in capsys.readouterr().err


def test_a_fresh_run_keeps_other_settings_runs_in_the_file(tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    other = {"key": "another setting", "d_model": 512}
    out.write_text(json.dumps({"runs": [other]}))
    monkeypatch.setattr(convergence, "train_one", fake_run([]))
    args = ["bench", "convergence", "--quick", "--stages", "2", "--no-plot", "--out", str(out)]
    assert main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs[0] == other and len(runs) == 9


def test_replay_prints_the_committed_table_and_trains_nothing(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    committed = RESULTS / "convergence-quick.json"
    stamp = committed.stat().st_mtime_ns

    def no_training(*a, **kw):
        raise AssertionError("--replay trained")

    monkeypatch.setattr(convergence, "train_one", no_training)
    assert main(["bench", "convergence", "--quick", "--replay"]) == 0
    got = capsys.readouterr()
    assert "gap %" in got.out and "uncompressed" in got.out
    assert "replaying 16 of 16 runs" in got.err and "measured earlier, not now" in got.err
    assert committed.stat().st_mtime_ns == stamp


def test_replay_of_a_missing_file_says_so(tmp_path, capsys):
    args = ["bench", "convergence", "--replay", "--out", str(tmp_path / "none.json")]
    assert main(args) == 2
    assert "no results file" in capsys.readouterr().err
