"""`resbm bench gap`'s arithmetic and bookkeeping, with a fake train function (no training):
paired gaps and t-intervals against hand computations, token efficiency, the headline rule, plan
sizes, the lr sweep's choice, resuming, and the JSON's schema."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from node.model.config import ModelConfig
from node.model.presets import parameter_count, wire_bytes_per_token
from resbm.bench import gap, gap_plan, gap_report

pytestmark = pytest.mark.unit

GAPS = {"128x bf16": 9.0, "128x bf16 norm": 7.0, "64x int8 qat": 6.0, "32x int4-channel qat": 5.0}
FORMS = {"128x bf16 iota": 8.5, "128x bf16 reembed": 1.0}  # the E/D form, beyond the paper
BEST_LR = {"baseline": 1.5e-3}  # every other kind does best at 6e-3


def fake_train(calls: list):
    """Baseline loss 2 + 0.05*seed; an arm's is the baseline's x (1 + gap/100), its gap
    GAPS[name] (a norm arm not listed: its sibling's - 2) -1/+1/+2 on seeds 1/2/3. On the sweep
    seed 0, an lr off the kind's best costs loss."""

    def train(spec: dict) -> dict:
        calls.append(spec)
        kind = gap_plan.arm_kind(spec)
        best = BEST_LR.get(kind, 6e-3)
        g = {**GAPS, **FORMS}.get(kind, GAPS.get(kind.replace(" norm", ""), 0.0) - 2.0)
        g = 0.0 if spec["compression"] == 1 else g + (0.0, -1.0, 1.0, 2.0)[spec["seed"]]
        loss = (2.0 + 0.05 * spec["seed"]) * (1 + g / 100)
        loss += 0.1 * abs(math.log(spec["lr"] / best)) if spec["seed"] == 0 else 0.0
        tokens = spec["steps"] * spec["batch_size"] * spec["seq_len"]
        cfg = gap_plan.model_config(spec, ModelConfig)
        wire = wire_bytes_per_token(cfg, spec["codec"], spec["batch_size"])
        return {
            "val_loss": loss,
            "val_tokens": 200_704,
            "curve": [[0, 0, 5.5], [spec["steps"], tokens, loss]],
            "train_loss": loss,
            "tokens": tokens,
            "parameters": parameter_count(cfg),
            "wire_bytes_per_token": wire,
            "wire_bytes_source": "computed",
            "seconds": 6.0,
        }

    return train


def test_t_table_and_interval_by_hand():
    assert gap_report.t95(1) == 12.706 and gap_report.t95(2) == 4.303
    assert gap_report.t95(10) == 2.228 and gap_report.t95(40) == 2.228  # conservative beyond
    with pytest.raises(ValueError):
        gap_report.t95(0)
    m, ci = gap_report.mean_ci([1.0, 2.0, 4.0])
    # sd^2 = (16/9 + 1/9 + 25/9) / 2 = 7/3; half = 4.303 * sqrt(7/3) / sqrt(3) = 3.794889
    assert m == pytest.approx(7 / 3)
    assert ci == pytest.approx([7 / 3 - 3.794889, 7 / 3 + 3.794889], abs=1e-6)
    assert gap_report.mean_ci([2.5]) == (2.5, None)
    assert gap_report.mean_ci([]) == (None, None)


def test_paired_gaps_use_only_seeds_both_finished():
    gaps, diffs = gap_report.paired_gaps({1: 2.2, 2: 2.1, 3: 2.3}, {1: 2.0, 2: 2.0, 4: 9.0})
    assert gaps == pytest.approx([10.0, 5.0]) and diffs == pytest.approx([0.2, 0.1])


def test_token_efficiency_interpolates_the_first_crossing():
    curve = [[0, 0, 5.0], [50, 100, 3.0], [100, 200, 2.0]]
    assert gap_report.token_efficiency(curve, 2.5) == pytest.approx(150 / 200)
    assert gap_report.token_efficiency(curve, 4.0) == pytest.approx(50 / 200)
    assert gap_report.token_efficiency(curve, 2.0) == pytest.approx(1.0)
    assert gap_report.token_efficiency(curve, 1.9) is None  # the baseline never got there
    assert gap_report.token_efficiency(curve, 6.0) == 0.0
    bumpy = [[0, 0, 5.0], [1, 100, 2.4], [2, 200, 2.6], [3, 300, 2.2]]
    assert gap_report.token_efficiency(bumpy, 2.5) == pytest.approx(100 * 2.5 / 2.6 / 300)


def _arm(name, group, stages, c, codec, wire, g, d=256):
    a = {"name": name, "group": group, "n_stages": stages, "d_model": d, "compression": c}
    return a | {
        "codec": codec,
        "wire_bytes_per_token": wire,
        "gap_pct_mean": g,
        "gap_pct_ci95": None,
    }


def test_headline_takes_the_best_arm_within_the_bytes_cap():
    arms = [
        _arm("baseline", "d256-2s-4L", 2, 1, "fp32", 1024.0, None),
        _arm("128x bf16", "d256-2s-4L", 2, 128, "bf16", 4.01, 9.0),
        _arm("64x int8 qat", "d256-2s-4L", 2, 64, "int8", 4.02, 7.0),
        _arm("32x int4", "d256-2s-4L", 2, 32, "int4-channel", 4.2, 5.0),  # 4.01*1.05 = 4.2105
        _arm("32x int4 big", "d256-2s-4L", 2, 32, "int4-channel", 4.22, 2.0),  # over the cap
        _arm("16x bf16", "d256-2s-4L", 2, 16, "bf16", 32.0, 1.0),
        _arm("128x bf16 wide", "d512-2s-4L", 2, 128, "bf16", 8.0, 0.5, 512),  # not d=256
        _arm("64x int8 qat", "d256-4s-4L", 4, 64, "int8", 4.1, 12.0),  # no 128x bf16: cap 4.2
        _arm("32x int4", "d256-4s-4L", 4, 32, "int4-channel", 4.3, 3.0),
    ]
    h = gap_report.headline(arms, 256)
    assert h["two_stage_gap_pct"] == 5.0 and h["two_stage_arm"] == "d256-2s-4L/32x int4"
    assert h["two_stage_wire_bytes_per_token"] == 4.2
    assert h["four_stage_gap_pct"] == 12.0 and h["four_stage_arm"] == "d256-4s-4L/64x int8 qat"
    assert set(h["by_group"]) == {"d256-2s-4L", "d256-4s-4L"}
    assert gap_report.headline(arms[:1], 256)["two_stage_gap_pct"] is None


def test_plan_sizes_per_mode():
    quick = gap_plan.build_plan("quick")
    assert [a["name"] for a in quick["arms"]] == ["baseline", *GAPS]
    assert (
        gap_plan.sweep_specs(quick, "fp") == [] and len(gap_plan.main_specs(quick, {}, "fp")) == 10
    )
    full, default = gap_plan.build_plan("full"), gap_plan.build_plan("default")
    sizes = {
        "full": ({"d256-2s-4L": 9, "d256-4s-8L": 7, "d256-4s-4L": 7, "d512-2s-4L": 2}, 9, 77),
        "default": (
            {"d256-2s-4L": 7, "d256-4s-8L": 5, "d512-2s-4L": 3, "d1024-2s-4L-100steps": 3},
            7,
            12 * 3 + 3 * 3 + 3,  # d=512 on 3 seeds, d=1024 on one
        ),
    }
    sizes["full"][0]["d1024-2s-4L-100steps"] = 2
    for plan in (full, default):
        groups = [gap_plan.group_id(a, plan["settings"]) for a in plan["arms"]]
        per_group, kinds, runs = sizes[plan["mode"]]
        assert {g: groups.count(g) for g in groups} == per_group
        assert len(gap_plan.sweep_specs(plan, "fp")) == kinds * 3  # each kind at 3 lrs
        assert len(gap_plan.main_specs(plan, {}, "fp")) == runs
    names = {a["name"] for a in default["arms"]}
    assert {"128x bf16 iota", "128x bf16 reembed", "32x int4-channel qat norm"} <= names
    assert all(a["name"] == "baseline" for a in full["arms"] if a["compression"] == 1)
    wide = gap_plan.select_groups(full, ["d512-2s-4L"])  # its kinds are still swept at d=256
    assert len(wide["arms"]) == 2 and len(gap_plan.sweep_specs(wide, "fp")) == 2 * 3
    with pytest.raises(ValueError, match="unknown group"):
        gap_plan.select_groups(full, ["d999"])
    with pytest.raises(ValueError):
        gap_plan.build_plan("slow")
    minutes = (
        sum(gap_report.estimate_seconds(s) for _, s in gap_plan.main_specs(quick, {}, "fp")) / 60
    )
    assert 8 < minutes < 20  # the ~15 min promised for --quick


def test_quick_summary_matches_hand_computation_and_resumes(tmp_path):
    out, calls = tmp_path / "gap-quick.json", []
    summary = gap.run_bench(
        gap_plan.build_plan("quick"), out, fake_train(calls), "fp", progress=False
    )
    assert len(calls) == 10
    arms = {a["name"]: a for a in summary["arms"]}
    a = arms["128x bf16"]
    assert a["gap_pct"] == pytest.approx([8.0, 10.0])
    # mean 9, sd sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert a["gap_pct_mean"] == pytest.approx(9.0)
    assert a["gap_pct_ci95"] == pytest.approx([9.0 - 12.706, 9.0 + 12.706])
    base = [2.05, 2.10]
    assert a["val_loss"]["per_seed"] == pytest.approx([base[0] * 1.08, base[1] * 1.10])
    assert a["val_bpb"]["mean"] == pytest.approx(a["val_loss"]["mean"] / math.log(2))
    diffs = [base[0] * 0.08, base[1] * 0.10]
    assert a["gap_bpb_mean"] == pytest.approx(sum(diffs) / 2 / math.log(2))
    # the baseline's curve is straight from (0, 5.5) to (all tokens, its loss)
    eff = [(5.5 - b * (1 + g)) / (5.5 - b) for b, g in zip(base, (0.08, 0.10), strict=True)]
    assert a["token_efficiency"]["per_seed"] == pytest.approx(eff)
    assert arms["baseline"]["gap_pct_mean"] is None and arms["baseline"]["lr"] == 3e-3
    h = summary["headline"]
    assert h["two_stage_arm"] == "d256-2s-4L/32x int4-channel qat" and h["four_stage_arm"] is None
    assert h["two_stage_gap_pct"] == pytest.approx(5.0)
    assert [w["d_model"] for w in summary["width_curve"]] == [256]
    assert summary["minutes"] == pytest.approx(10 * 6.0 / 60)

    stamp = out.read_text()
    again = gap.run_bench(
        gap_plan.build_plan("quick"), out, fake_train(calls), "fp", progress=False
    )
    assert len(calls) == 10 and again == summary  # nothing retrained
    assert json.loads(out.read_text()) == json.loads(stamp)
    other = gap.run_bench(
        gap_plan.build_plan("quick"), out, fake_train(calls), "fp2", progress=False
    )
    assert len(calls) == 20 and other["settings"]["data"] == "fp2"  # new data: new runs


def test_full_plan_sweeps_lr_on_an_unreported_seed(tmp_path):
    calls = []
    summary = gap.run_bench(
        gap_plan.build_plan("full"), tmp_path / "gap.json", fake_train(calls), "fp", progress=False
    )
    assert len(calls) == 27 + 77
    assert {c["seed"] for c in calls[:27]} == {0} and all(
        c["seed"] in (1, 2, 3) for c in calls[27:]
    )
    for a in summary["arms"]:
        assert a["lr"] == (1.5e-3 if a["compression"] == 1 else 6e-3), a["name"]
    assert [w["d_model"] for w in summary["width_curve"]] == [256, 512, 1024]
    assert summary["width_curve"][-1]["gap_pct_ci95"] is None  # one seed: no interval
    h = summary["headline"]
    assert h["four_stage_arm"] == "d256-4s-8L/32x int4-channel qat norm"  # 5 - 2 + 2/3
    # reembed has the lowest gap, but every stage needs the data: it is reported apart
    assert h["two_stage_gap_pct"] == pytest.approx(3.0 + 2 / 3)
    assert h["beyond_paper"]["two_stage_arm"] == "d256-2s-4L/128x bf16 reembed"
    assert h["beyond_paper"]["two_stage_gap_pct"] == pytest.approx(1.0 + 2 / 3)
    arms = {(a["group"], a["name"]): a for a in summary["arms"]}
    params = {n: arms[("d256-2s-4L", n)]["parameters_vs_baseline_pct"] for n in FORMS}
    params["mlp"] = arms[("d256-2s-4L", "128x bf16")]["parameters_vs_baseline_pct"]
    # IOTA's form has fewer parameters than even the baseline (a block's feed-forward narrows
    # to b, as a SwiGLU of 2/3 width); the MLP E/D adds ~4%; reembed adds a 256 x d table
    assert params["128x bf16 iota"] < 0 < params["mlp"] < params["128x bf16 reembed"]
    assert "reembed: every stage holds the data" in gap_report.table(summary)


def test_cli_writes_the_schema_table_and_plots(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gap, "prepare_data", lambda corpus: (tmp_path, "fp"))
    monkeypatch.setattr(gap, "train_one", lambda spec, *a: fake_train(calls)(spec))
    parser = argparse.ArgumentParser()
    gap.add_parser(parser.add_subparsers())
    out = tmp_path / "g.json"
    args = parser.parse_args(["gap", "--quick", "--out", str(out), "--threads", "1"])
    assert args.handler(args) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"arms", "width_curve", "headline", "settings", "minutes", "runs"}
    required = {"name", "d_model", "n_stages", "n_layers", "compression", "codec", "qat"}
    required |= {"boundary_norm", "encoder", "parameters", "wire_bytes_per_token", "lr", "seeds"}
    required |= {"val_loss", "val_bpb", "gap_pct_mean", "gap_pct_ci95", "token_efficiency"}
    assert all(required <= set(a) for a in doc["arms"])
    assert {"two_stage_gap_pct", "four_stage_gap_pct", "two_stage_wire_bytes_per_token"} <= set(
        doc["headline"]
    )
    assert {"d_model", "gap_pct"} <= set(doc["width_curve"][0])
    assert doc["settings"]["val_tokens"] >= 200_000 and doc["arms"][0]["val_tokens"] >= 200_000
    assert "gap %" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    assert (tmp_path / "g-curves.png").stat().st_size > 1000


def test_val_windows_cover_200k_distinct_positions():
    n_val = int(1_115_394 * gap.VAL_FRACTION)  # the bundled corpus at a 20% split
    assert gap.eval_windows(n_val, 128, 200_000) == (49, 49 * 32 * 128)
    assert gap.eval_windows(n_val, 64, 200_000)[1] >= 200_000
    assert gap.eval_windows(111_539, 128, 200_000)[1] < 200_000  # the default 10% is too small
