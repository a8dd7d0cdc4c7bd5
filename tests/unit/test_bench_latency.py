"""`resbm bench latency`'s plan and its verdict on the trade-off at the goal link (#11): the
least D that keeps 90% of the no-latency speed, and whether its rule's loss cost meets 1%."""

from __future__ import annotations

import json
import math

import pytest

from resbm.bench.latency import LINKS, parse_plan, shares
from resbm.bench.latency_report import GOAL_LINK, trade_off
from resbm.cli import main

pytestmark = pytest.mark.unit


def test_a_plan_fixes_d_per_link_and_refuses_what_is_not_one():
    assert parse_plan(["100mbit:50ms=6", "100mbit:25ms=3"], LINKS, 16) == {
        "100mbit:50ms": 6,
        "100mbit:25ms": 3,
    }
    for bad in ["100mbit:50ms", "100mbit:50ms=x", "100mbit:50ms=17", "10mbit:5ms=2"]:
        with pytest.raises(ValueError, match="LINK=D"):
            parse_plan([bad], LINKS, 16)


def row(schedule: str, d: int, share: float, link: str = GOAL_LINK, window: int = 0) -> dict:
    return {"schedule": schedule, "overlap": d, "link": link, "window": window, "vs_none": share}


def cost(d: int, pct: float) -> dict:
    return {"overlap": d, "cost_pct": pct, "ci95_pct": [pct - 0.5, pct + 0.5]}


def test_the_least_d_that_keeps_90_percent_is_judged_on_its_loss_cost():
    rows = [
        row("1f1b", 0, 0.85),
        row("1f1b", 0, 0.40, window=4),  # a least window: not on the frontier
        row("overlapped", 6, 0.96),
        row("overlapped", 3, 0.89),
        row("overlapped", 4, 0.93),
        row("overlapped", 9, 0.99, link="100mbit:100ms"),
    ]
    [line] = trade_off(rows, {3: cost(3, 0.0), 4: cost(4, 0.4), 6: cost(6, 1.2)})
    assert "D=0 85.0%, D=3 89.0%, D=4 93.0%, D=6 96.0%" in line
    assert "least D that keeps 90% is 4" in line and "+0.40%" in line
    assert "both goals met" in line
    [line] = trade_off(rows, {4: cost(4, 1.3)})
    assert "the loss goal missed" in line
    [line] = trade_off([row("1f1b", 0, 0.92), row("overlapped", 6, 0.97)], {})
    assert "least D that keeps 90% is 0" in line and "no loss cost" in line
    [line] = trade_off([row("overlapped", 3, 0.8)], {})
    assert "no D tried keeps 90%" in line
    assert trade_off([row("overlapped", 3, 0.8, link="none")], {}) == []


def test_rounds_side_by_side_judge_the_median_and_say_the_range():
    rounds = [
        {"round": i, "overlap": d, "vs_none": v}
        for i, shares in enumerate([(0.88, 0.91, 0.95), (0.86, 0.89, 0.93), (0.90, 0.86, 0.97)])
        for d, v in zip((0, 3, 6), shares, strict=True)
    ]
    one_run = [row("1f1b", 0, 0.95)]  # the main table's run: not what is judged with rounds
    [line] = trade_off(one_run, {3: cost(3, 0.0), 6: cost(6, 1.2)}, rounds)
    assert "median of 3 rounds" in line
    assert "D=0 88.0% (86.0%-90.0%), D=3 89.0% (86.0%-91.0%), D=6 95.0% (93.0%-97.0%)" in line
    assert "least D that keeps 90% is 6" in line and "the loss goal missed" in line


def test_each_link_is_measured_against_its_own_loopback_run():
    """The machine's speed drifts over a run by more than latency costs: a link's runs are
    against the loopback run just before them, the loopback link against its two runs."""
    rows = [
        {"link": "none", "group": 0, "tokens_per_s": 100.0},
        {"link": "none", "group": 0, "tokens_per_s": 110.0},
        {"link": "none", "group": 1, "tokens_per_s": 140.0, "baseline": True},
        {"link": GOAL_LINK, "group": 1, "tokens_per_s": 126.0},
    ]
    assert shares(rows) == pytest.approx((100 + 110 + 140) / 3)
    assert [r["vs_none"] for r in rows] == pytest.approx([100 / 105, 110 / 105, 1.0, 0.9])


def test_loss_only_runs_are_reused_only_if_this_code_still_gives_them(tmp_path, capsys):
    """--loss-only writes the paired costs alone; --loss-from takes them, with a D it lacks run,
    only if 1f1b and every D at seed 0 come out bit for bit again, and every D was paired with
    the same 1f1b runs: a chain of reuses had paired runs of two versions of the code."""
    tiny = ["--stages", "2", "--d-model", "32", "--n-layers", "2", "--n-heads", "2"]
    tiny += ["--seq-len", "16", "--compression", "8", "--batch-size", "2", "--microbatches", "4"]
    tiny += ["--loss-steps", "2", "--loss-seeds", "2"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert main(["bench", "latency", *tiny, "--loss-only", "1", "--out", str(first)]) == 0
    doc = json.loads(first.read_text())
    assert [c["overlap"] for c in doc["loss_costs"]] == [1] and doc["loss_seeds"] == [0, 1]
    assert len(doc["loss_costs"][0]["val_1f1b"]) == 2
    again = ["bench", "latency", *tiny, "--loss-only", "1", "2", "--loss-from", str(first)]
    assert main([*again, "--out", str(second)]) == 0
    costs = json.loads(second.read_text())["loss_costs"]
    assert [c["overlap"] for c in costs] == [1, 2] and costs[0] == doc["loss_costs"][0]
    assert costs[1]["val_1f1b"] == costs[0]["val_1f1b"]  # paired with the same 1f1b runs
    assert "loss cost at D=2" in capsys.readouterr().out
    # what another version of the code gave: 1f1b's seed 0, or a later D's
    reuse = ["bench", "latency", *tiny, "--loss-only", "1", "2", "--out", str(tmp_path / "x")]
    for tamper in ("1f1b", "second D"):
        doc = json.loads(second.read_text())
        if tamper == "1f1b":
            for c in doc["loss_costs"]:
                c["val_1f1b"][0] = math.nextafter(c["val_1f1b"][0], 9.0)  # one ulp
        else:
            o = doc["loss_costs"][1]["val_overlapped"]
            o[0] = math.nextafter(o[0], 9.0)
        first.write_text(json.dumps(doc))
        with pytest.raises(SystemExit, match="came from other code"):
            main([*reuse, "--loss-from", str(first)])
    doc = json.loads(second.read_text())  # D paired with other 1f1b runs: refused unrun
    doc["loss_costs"][1]["val_1f1b"] = [v + 1e-6 for v in doc["loss_costs"][1]["val_1f1b"]]
    first.write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="different 1f1b runs"):
        main([*reuse, "--loss-from", str(first)])
    doc = json.loads(second.read_text())  # a reused cost is its runs', not the file's figures
    want = {k: doc["loss_costs"][0][k] for k in ("cost_pct", "ci95_pct", "per_seed_pct")}
    doc["loss_costs"][0].update(cost_pct=99.0, ci95_pct=[98.0, 100.0], per_seed_pct=[99.0, 99.0])
    first.write_text(json.dumps(doc))
    third = tmp_path / "third.json"
    redo = ["bench", "latency", *tiny, "--loss-only", "1", "--loss-from", str(first)]
    assert main([*redo, "--out", str(third)]) == 0
    got = json.loads(third.read_text())["loss_costs"][0]
    assert {k: got[k] for k in want} == want
    doc = json.loads(second.read_text())  # another prediction scale: refused unrun; a file
    assert doc["setting"]["predict_scale"] == 1.0  # from before the setting is of the whole one
    for scale, refused in ((0.5, True), (None, False)):
        if scale is None:
            del doc["setting"]["predict_scale"]
        else:
            doc["setting"]["predict_scale"] = scale
        first.write_text(json.dumps(doc))
        if refused:
            with pytest.raises(SystemExit, match="ran another setting"):
                main([*reuse, "--loss-from", str(first)])
        else:
            assert main([*reuse, "--loss-from", str(first)]) == 0
