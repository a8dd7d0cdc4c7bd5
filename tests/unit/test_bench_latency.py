"""`resbm bench latency`'s plan and its verdict on the trade-off at the goal link (#11): the
least D that keeps 90% of the no-latency speed, and whether its rule's loss cost meets 1%."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from resbm.bench.latency import LINKS, parse_plan, shares
from resbm.bench.latency_report import GOAL_LINK, trade_off

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


def test_reused_loss_runs_are_checked_against_this_code(tmp_path):
    """--loss-from takes an earlier JSON's loss runs only if this code still gives them: a chain
    of reuses had paired 1f1b runs of an older model code with overlapped runs of a newer one."""
    from resbm.bench.latency_loss import loss_run, reused_costs

    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16, "n_stages": 2}
    model["compression"] = 8
    plain = {"loss_steps": 2, "batch_size": 2, "microbatches": 4}
    setting = {k: model[k] for k in ("d_model", "n_layers", "n_heads", "seq_len")}
    setting.update(stages=2, compression=8, batch_size=2, microbatches=4, loss_steps=2)
    exact = loss_run(model, plain, "1f1b", None, 0)
    late = loss_run(model, plain, "overlapped", 1, 0)
    cost = {"overlap": 1, "cost_pct": 0.0, "val_1f1b": [exact], "val_overlapped": [late]}
    path = tmp_path / "old.json"
    args = Namespace(loss_from=path, loss_seeds=1, loss_steps=2, batch_size=2, microbatches=4)
    path.write_text(json.dumps({"setting": setting, "loss_seeds": [0], "loss_costs": [cost]}))
    assert reused_costs(args, setting, model, [1]) == {1: cost}
    cost["val_1f1b"] = [exact + 1e-6]  # what another version of the code gave
    path.write_text(json.dumps({"setting": setting, "loss_seeds": [0], "loss_costs": [cost]}))
    with pytest.raises(SystemExit, match="came from other code"):
        reused_costs(args, setting, model, [1])
