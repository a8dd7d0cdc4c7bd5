"""The numbers `resbm bench gap` reports, from its finished runs: paired gaps with t-intervals,
bits per byte, token efficiency, the width curve and the headline; then a table and plots.

Pure functions over the runs' JSON (no torch, no training), so the arithmetic is tested by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from resbm.bench.gap_plan import (
    ARM_KEYS,
    CURVE_FRACTION,
    Spec,
    arm_lr,
    choose_lrs,
    group_id,
    main_specs,
    model_config,
    run_key,
    run_spec,
    sweep_specs,
)

# two-sided 95% critical values of Student's t (scipy is not a dependency); df > 10 uses df 10's
# 2.228, a slightly wider interval than the truth (1.96 at infinity), never a narrower one
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
T95 |= {9: 2.262, 10: 2.228}
BYTES_SLACK = 1.05  # the headline admits arms up to 5% over 128x bf16's bytes (scales, framing)
LN2 = math.log(2)
# training FLOP/s of this repo's 2-core CI machine, from bench convergence's d=256 runs
# (flops_per_token x tokens/s: 45-70 GFLOP/s); only the printed time estimate uses it
CPU_FLOPS = 5e10


def t95(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 samples (df >= 1), got df={df}")
    return T95[min(df, 10)]


def mean_ci(xs: list[float]) -> tuple[float | None, list[float] | None]:
    """Mean and 95% t-interval [lo, hi] (sample sd, n - 1 dof); no interval from one sample."""
    if not xs:
        return None, None
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, None
    half = t95(n - 1) * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    return m, [m - half, m + half]


def paired_gaps(arm: dict[int, float], base: dict[int, float]) -> tuple[list, list]:
    """Per seed both finished: (gap in % of the baseline's loss, loss difference)."""
    seeds = sorted(set(arm) & set(base))
    return [100 * (arm[s] / base[s] - 1) for s in seeds], [arm[s] - base[s] for s in seeds]


def token_efficiency(base_curve: list[list[float]], target: float) -> float | None:
    """The fraction of the baseline's tokens it took to first reach `target` loss, linearly
    interpolated between its curve points ([step, tokens, loss], step 0 first); None if it
    never did (the arm ended below the baseline). Both losses must come from the same windows."""
    total = base_curve[-1][1]
    prev = None
    for _, tokens, loss in base_curve:
        if loss <= target:
            if prev is None:
                return 0.0
            t0, l0 = prev
            return (t0 + (l0 - target) / (l0 - loss) * (tokens - t0)) / total
        prev = (tokens, loss)
    return None


def _pct(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else 100 * (x / ref - 1)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"per_seed": xs, "mean": sum(xs) / len(xs) if xs else None}


def _bits(x: float | list[float] | None) -> float | list[float] | None:
    """nats per byte -> bits per byte (byte tokens: a token is a byte)."""
    return None if x is None else [v / LN2 for v in x] if isinstance(x, list) else x / LN2


def arm_summary(arm: dict, group: str, lr: float, mine: dict, base: dict) -> dict[str, Any]:
    """One arm of gap.json from its finished runs and its group baseline's, by seed."""
    loss = {seed: r["val_loss"] for seed, r in sorted(mine.items())}
    gaps, diffs = paired_gaps(loss, {seed: r["val_loss"] for seed, r in base.items()})
    compressed = arm["compression"] > 1
    # the arm's last curve point against the baseline's curve: the same (curve) windows
    eff = [
        token_efficiency(base[seed]["curve"], r["curve"][-1][2])
        for seed, r in sorted(mine.items())
        if seed in base
    ]
    any_run = next(iter(mine.values()), {})
    out = {
        "name": arm["name"],
        "group": group,
        **{k: arm[k] for k in ARM_KEYS},
        "steps": any_run.get("steps"),
        "parameters": any_run.get("parameters"),
        "parameters_vs_baseline_pct": _pct(
            any_run.get("parameters"), next(iter(base.values()), {}).get("parameters")
        ),
        "wire_bytes_per_token": any_run.get("wire_bytes_per_token"),
        "wire_bytes_source": any_run.get("wire_bytes_source"),
        "lr": lr,
        "seeds": list(loss),
        "val_tokens": any_run.get("val_tokens"),
        "val_loss": _stats(list(loss.values())),
        "val_bpb": _stats(_bits(list(loss.values()))),
        "gap_pct": None,
        "gap_pct_mean": None,
        "gap_pct_ci95": None,
        "gap_bpb_mean": None,
        "gap_bpb_ci95": None,
        "token_efficiency": None,
        "curve_mean": _mean_curve([r["curve"] for _, r in sorted(mine.items())]),
    }
    if compressed:
        (m, ci), (dm, dci) = mean_ci(gaps), mean_ci(diffs)
        out.update(gap_pct=gaps, gap_pct_mean=m, gap_pct_ci95=ci)
        out.update(gap_bpb_mean=_bits(dm), gap_bpb_ci95=_bits(dci))
        reached = [e for e in eff if e is not None]  # the mean is over seeds that got there
        out["token_efficiency"] = {**_stats(reached), "per_seed": eff, "reached": len(reached)}
    return out


def summarize(
    plan: dict[str, Any], lrs: dict[str, float], runs: dict[str, dict], data: str
) -> dict[str, Any]:
    """gap.json's summary: `arms`, `width_curve`, `headline`, `settings`, `minutes`."""
    s = plan["settings"]
    found: dict[tuple, dict[int, dict]] = {}  # (group, name) -> seed -> run
    for a in plan["arms"]:
        lr = arm_lr(a, plan, lrs)
        got = {
            x: runs.get(run_key(run_spec(a, s, lr, x, data))) for x in a.get("seeds", s["seeds"])
        }
        found[(group_id(a, s), a["name"])] = {k: v for k, v in got.items() if v is not None}
    arms = [
        arm_summary(
            a,
            (gid := group_id(a, s)),
            arm_lr(a, plan, lrs),
            found[(gid, a["name"])],
            found.get((gid, "baseline"), {}),
        )
        for a in plan["arms"]
    ]
    return {
        "arms": arms,
        "width_curve": width_curve(arms),
        "headline": headline(arms, s["headline_d"]),
        "settings": {
            **s,
            "mode": plan["mode"],
            "data": data,
            "lrs": lrs,
            "bpb": "val_bpb = val loss / ln 2: byte tokens, one token is one byte",
            "gap_bpb": "gap_bpb_* = arm's val bpb minus its baseline's, same seed (bits/byte)",
            "val_loss": "through the arm's wire codec (fake_quantize at every boundary)",
        },
        "minutes": sum(r.get("seconds", 0.0) for r in _plan_runs(plan, lrs, runs, data)) / 60,
    }


def _mean_curve(curves: list[list]) -> list[list[float]] | None:
    """[tokens, mean loss] where every seed's curve has the same points (they do: one plan)."""
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    return [[pts[0][1], sum(p[2] for p in pts) / len(pts)] for pts in zip(*curves, strict=True)]


def _plan_runs(plan, lrs, runs, data) -> list[dict]:
    specs = [sp for _, sp in sweep_specs(plan, data)] + [
        sp for _, sp in main_specs(plan, lrs, data)
    ]
    return [runs[k] for k in map(run_key, specs) if k in runs]


def width_curve(arms: list[dict]) -> list[dict[str, Any]]:
    """The 2-stage 128x bf16 arm (no qat, no norm) at every width the plan trained."""
    keep = [
        a
        for a in arms
        if tuple(a[k] for k in ARM_KEYS[3:]) == (128, "bf16", False, False, "mlp", False)
        and a["n_stages"] == 2
        and a["gap_pct_mean"] is not None
    ]
    return [
        {
            "d_model": a["d_model"],
            "group": a["group"],
            "steps": a["steps"],
            "seeds": a["seeds"],
            "gap_pct": a["gap_pct_mean"],
            "gap_pct_ci95": a["gap_pct_ci95"],
            "wire_bytes_per_token": a["wire_bytes_per_token"],
        }
        for a in sorted(keep, key=lambda a: a["d_model"])
    ]


def bytes_cap(arms: list[dict], group: str, d_model: int) -> float:
    """What 128x bf16 sends per token per boundary in this group (its own measured count when
    it ran; else b=d/128 values of 2 bytes), times BYTES_SLACK."""
    ref = [
        a["wire_bytes_per_token"]
        for a in arms
        if a["group"] == group
        and (a["compression"], a["codec"]) == (128, "bf16")
        and a["wire_bytes_per_token"] is not None
    ]
    return (min(ref) if ref else 2 * d_model / 128) * BYTES_SLACK


def best_arm(arms: list[dict], n_stages: int, d_model: int, reembed: bool = False) -> dict | None:
    """The lowest mean gap among compressed arms at this width and stage count whose bytes per
    token per boundary are within their group's cap (see bytes_cap). Arms that re-embed tokens
    on every stage (beyond the paper: every stage needs the data) compete only with each other."""
    ok = [
        a
        for a in arms
        if a["compression"] > 1
        and a.get("reembed", False) == reembed
        and a["n_stages"] == n_stages
        and a["d_model"] == d_model
        and a["gap_pct_mean"] is not None
        and a["wire_bytes_per_token"] is not None
        and a["wire_bytes_per_token"] <= bytes_cap(arms, a["group"], d_model)
    ]
    return min(ok, key=lambda a: a["gap_pct_mean"], default=None)


def headline(arms: list[dict], d_model: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "d_model": d_model,
        "rule": f"lowest mean gap among arms at d={d_model} sending at most {BYTES_SLACK:.2f}x "
        "the bytes per token per boundary of 128x bf16 in their group",
    }
    for word, k in (("two", 2), ("four", 4)):
        a = best_arm(arms, k, d_model)
        out[f"{word}_stage_gap_pct"] = a and a["gap_pct_mean"]
        out[f"{word}_stage_gap_pct_ci95"] = a and a["gap_pct_ci95"]
        out[f"{word}_stage_arm"] = a and f"{a['group']}/{a['name']}"
        out[f"{word}_stage_wire_bytes_per_token"] = a and a["wire_bytes_per_token"]
    out["beyond_paper"] = {}  # reembed arms: no wire bytes, but every stage holds the data
    for word, k in (("two", 2), ("four", 4)):
        a = best_arm(arms, k, d_model, reembed=True)
        out["beyond_paper"][f"{word}_stage_gap_pct"] = a and a["gap_pct_mean"]
        out["beyond_paper"][f"{word}_stage_gap_pct_ci95"] = a and a["gap_pct_ci95"]
        out["beyond_paper"][f"{word}_stage_arm"] = a and f"{a['group']}/{a['name']}"
    out["by_group"] = {}
    groups = {a["group"]: a["n_stages"] for a in arms if a["d_model"] == d_model}
    for g, stages in groups.items():
        a = best_arm([x for x in arms if x["group"] == g], stages, d_model)
        out["by_group"][g] = a and {
            "arm": a["name"],
            "gap_pct": a["gap_pct_mean"],
            "gap_pct_ci95": a["gap_pct_ci95"],
            "wire_bytes_per_token": a["wire_bytes_per_token"],
        }
    return out


# ---- time ----------------------------------------------------------------------------------
def estimate_seconds(spec: Spec) -> float:
    """A run's time on 2 CPU cores by FLOPs (node/model/presets.py): training 6N per token,
    each val forward a third of that, at CPU_FLOPS; plus a few seconds to build and load."""
    from node.model.config import ModelConfig
    from node.model.presets import flops_per_token

    cfg = model_config(spec, ModelConfig)
    f = flops_per_token(cfg)
    train = spec["steps"] * spec["batch_size"] * spec["seq_len"]
    val = spec["val_tokens"] * (1 + (spec["curve_points"] + 1) / CURVE_FRACTION)
    return (f * train + f / 3 * val) / CPU_FLOPS + 5


def remaining(plan: dict[str, Any], runs: list[dict], data: str) -> dict[str, tuple]:
    """Per phase ("sweep", then each group): (runs left, runs in all, estimated minutes left).
    Until the sweep has finished, the reported runs' lrs (and so their keys) are a guess."""
    have = {r["key"]: r for r in runs}
    lrs = choose_lrs(plan, have, data)
    rows = [("sweep", s) for _, s in sweep_specs(plan, data)]
    rows += [(group_id(a, plan["settings"]), s) for a, s in main_specs(plan, lrs, data)]
    out: dict[str, tuple[int, int, float]] = {}
    for what, spec in rows:
        n, total, m = out.get(what, (0, 0, 0.0))
        left = run_key(spec) not in have
        out[what] = (n + left, total + 1, m + (estimate_seconds(spec) / 60 if left else 0.0))
    return out


# ---- table and plots ---------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _params(arm: dict[str, Any]) -> str:
    pct = arm.get("parameters_vs_baseline_pct")
    if arm["compression"] == 1 or pct is None:
        return "" if arm["parameters"] is None else f"{arm['parameters'] / 1e6:.2f}M"
    return f"{pct:+.1f}%"


def table(summary: dict[str, Any]) -> str:
    head = (
        f"{'group':<18} {'arm':<30} {'B/tok':>6} {'params':>7} {'lr':>7} {'n':>2} "
        f"{'val loss':>8} {'bpb':>6} {'gap %':>7} {'95% CI':>15} {'tok eff':>7}"
    )
    lines = [head, "-" * len(head)]
    for a in summary["arms"]:
        ci = a["gap_pct_ci95"]
        eff = a["token_efficiency"] and a["token_efficiency"]["mean"]
        lines.append(
            f"{a['group']:<18} {a['name']:<30} {_fmt(a['wire_bytes_per_token'], '6.2f')} "
            f"{_params(a):>7} {a['lr']:>7.1e} {len(a['seeds']):>2} "
            f"{_fmt(a['val_loss']['mean'], '8.4f')} "
            f"{_fmt(a['val_bpb']['mean'], '6.3f')} {_fmt(a['gap_pct_mean'], '+7.2f')} "
            f"{'' if ci is None else f'[{ci[0]:+.2f}, {ci[1]:+.2f}]':>15} {_fmt(eff, '7.2f')}"
        )
    h = summary["headline"]
    for word in ("two", "four"):
        if h[f"{word}_stage_gap_pct"] is not None:
            lines.append(
                f"headline, {word} stages: {h[f'{word}_stage_gap_pct']:+.2f}% "
                f"({h[f'{word}_stage_arm']}, {h[f'{word}_stage_wire_bytes_per_token']:.2f} B/tok)"
            )
    beyond = h.get("beyond_paper", {})
    for word in ("two", "four"):
        if beyond.get(f"{word}_stage_gap_pct") is not None:
            lines.append(
                f"beyond the paper (reembed: every stage holds the data), {word} stages: "
                f"{beyond[f'{word}_stage_gap_pct']:+.2f}% ({beyond[f'{word}_stage_arm']})"
            )
    lines.append("params: the arm's parameter count against its group baseline's")
    lines.append(f"{summary['minutes']:.1f} min of training in these runs")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """<out>-curves.png: mean val curves per group; <out>.png: the gap against wire bytes per
    token per boundary (each arm with its 95% interval), and the width curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    groups = list(dict.fromkeys(a["group"] for a in arms))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for a in (a for a in arms if a["group"] == g and a["curve_mean"]):
            x, y = zip(*a["curve_mean"][1:], strict=True)  # from the first eval after step 0
            ax.plot(x, y, marker=".", label=f"{a['name']} ({_fmt(a['val_loss']['mean'], '.3f')})")
        ax.set(title=g, xlabel="tokens", ylabel="val loss (curve windows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    curves = out.with_name(out.stem + "-curves.png")
    _save(fig, curves)

    fig, (ax, aw) = plt.subplots(1, 2, figsize=(11, 4))
    for g in groups:
        pts = [a for a in arms if a["group"] == g and a["gap_pct_mean"] is not None]
        pts = [a for a in pts if a["wire_bytes_per_token"] is not None]
        if not pts:
            continue
        ax.errorbar(
            [a["wire_bytes_per_token"] for a in pts],
            [a["gap_pct_mean"] for a in pts],
            yerr=[_half(a["gap_pct_ci95"], a["gap_pct_mean"]) for a in pts],
            fmt="o",
            capsize=3,
            label=g,
        )
        for a in pts:
            ax.annotate(a["name"], (a["wire_bytes_per_token"], a["gap_pct_mean"]), fontsize=6)
    xs = [a["wire_bytes_per_token"] for a in arms if a["gap_pct_mean"] is not None]
    xs = [x for x in xs if x]
    if xs and max(xs) > 4 * min(xs):  # a frontier of equal bytes spans a few % only: linear
        ax.set_xscale("log", base=2)
    ax.set(xlabel="wire bytes / token / boundary", ylabel="val loss gap vs baseline (%)")
    ax.set_title("frontier (95% t-intervals over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    w = summary["width_curve"]
    if w:
        aw.errorbar(
            [p["d_model"] for p in w],
            [p["gap_pct"] for p in w],
            yerr=[_half(p["gap_pct_ci95"], p["gap_pct"]) for p in w],
            fmt="o-",
            capsize=3,
        )
    aw.set_xscale("log", base=2)
    aw.set(xlabel="d_model", ylabel="gap (%)", title="128x bf16, 2 stages: gap vs width")
    aw.grid(alpha=0.3)
    frontier = out.with_suffix(".png")
    _save(fig, frontier)
    return [frontier, curves]


def _half(ci: list[float] | None, mean: float) -> float:
    return 0.0 if ci is None else ci[1] - mean


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
