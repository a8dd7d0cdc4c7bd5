"""`resbm bench latency`'s report: the table, the verdict on #11's two goals, the speed/loss
trade-off at the goal link, and the plot (tokens/s over latency, the rule's loss cost over D,
and the trade-off)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

GOAL_LINK = "100mbit:50ms"


def latency_s(link: str) -> float:
    from resbm.wan import LinkSpec

    return 0.0 if link == "none" else LinkSpec.parse(link).latency_s


def table(rows: list[dict[str, Any]], setting: dict[str, Any]) -> str:
    s = setting
    lines = [
        f"{s['stages']} stages x 1 replica, d={s['d_model']}, {s['n_layers']} layers, "
        f"{s['microbatches']} microbatches of {s['batch_size']}x{s['seq_len']} tokens a step, "
        f"wire {s['wire_codec']}, 1 thread a node; rates over steps {s['warmup']}..{s['steps']}",
        "",
    ]
    head = (
        f"{'schedule':>10} {'window':>8} {'D':>3} {'link':>14} {'tok/s':>7} {'vs none':>7} "
        f"{'s/step':>7} {'model':>7} {'drain':>6} {'wait':>6}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        share = f"{r['vs_none']:.1%}" if r.get("vs_none") is not None else "-"
        a = r["analytic"]
        window = r["window"] or f"~{r['window_used']:g}" + ("*" if r.get("sweep") else "")
        window = f"{window} (base)" if r.get("baseline") else window
        lines.append(
            f"{r['schedule']:>10} {window:>8} {r['overlap']:>3} {r['link']:>14} "
            f"{r['tokens_per_s']:>7.0f} {share:>7} {r['s_per_step']:>7.3f} "
            f"{a['s_per_step']:>7.3f} {a['drain_s']:>6.3f} {a['wait_s']:>6.3f}"
        )
    lines.append(
        "(seconds. window: stage 0's microbatches in flight, fixed, or ~K: sized at run time "
        "(node/protocol/window.py), K its median (*: a D tried at the goal link; base: the "
        "loopback run the next link's runs are against); D: the overlap; vs none: against the "
        "loopback run(s) of its link (just before them); model: the analytic step "
        "(analytic_model in the JSON); drain: 2(S-1) one-way delays; wait: what the model "
        "says a step waits at its end)"
    )
    return "\n".join(lines)


def verdict(rows, costs, goal_overlap) -> list[str]:
    out = []
    by = {
        (r["schedule"], r["window"] > 0, r["link"]): r
        for r in rows
        if not r.get("sweep") and not r.get("baseline")
    }
    ov, ex = by.get(("overlapped", False, GOAL_LINK)), by.get(("1f1b", False, GOAL_LINK))
    if ov and ov["vs_none"] is not None:
        ok = "meets" if ov["vs_none"] >= 0.9 else "misses"
        exact = f"; 1f1b keeps {ex['vs_none']:.1%}" if ex and ex["vs_none"] is not None else ""
        least = by.get(("1f1b", True, GOAL_LINK))
        if exact and least and least["vs_none"] is not None:
            exact += f" ({least['vs_none']:.1%} at its least window, {least['window']})"
        out.append(
            f"At {GOAL_LINK} the overlapped schedule (D={ov['overlap']}, window sized at run "
            f"time: {ov['window_used']:g}) keeps {ov['vs_none']:.1%} of its no-latency tokens/s "
            f"({ok} the 90% goal){exact}."
        )
    c = costs.get(goal_overlap)
    if c:
        lo, hi = c["ci95_pct"]
        ok = "meets" if c["cost_pct"] <= 1.0 else "misses"
        out.append(
            f"Its rule at D={goal_overlap} costs {c['cost_pct']:+.2f}% val loss against 1f1b "
            f"(95% CI [{lo:+.2f}, {hi:+.2f}], {len(c['per_seed_pct'])} paired seeds): {ok} the "
            "1% goal."
        )
    return out


def frontier(rows, rounds: list[dict] | None = None) -> list[dict[str, Any]]:
    """At the goal link, window sized: 1f1b (D = 0) and every D the overlapped schedule ran,
    as {overlap, share, lo, hi}. With `rounds` (--rounds: the same runs repeated side by side,
    each against its own round's loopback run), the median share and the range; else the
    main table's one run."""
    if rounds:
        by: dict[int, list[float]] = {}
        for r in rounds:
            by.setdefault(r["overlap"], []).append(r["vs_none"])
        return [
            {"overlap": d, "share": statistics.median(v), "lo": min(v), "hi": max(v), "n": len(v)}
            for d, v in sorted(by.items())
        ]
    pts = [
        {"overlap": r["overlap"], "share": r["vs_none"], "lo": r["vs_none"], "hi": r["vs_none"]}
        for r in rows
        if r["link"] == GOAL_LINK and not r["window"] and r.get("vs_none") is not None
    ]
    return sorted(pts, key=lambda r: r["overlap"])


def trade_off(rows, costs, rounds: list[dict] | None = None) -> list[str]:
    """The least D that keeps 90% at the goal link (the median of the rounds, if any), and
    what its rule costs: where the two goals meet, if they do."""
    pts = frontier(rows, rounds)
    if not pts:
        return []
    where = f"At {GOAL_LINK}, window sized"
    if rounds:
        where += f", median of {max(p['n'] for p in pts)} rounds side by side"
    said = ", ".join(f"D={p['overlap']} {p['share']:.1%}" for p in pts)
    if rounds:
        said = ", ".join(
            f"D={p['overlap']} {p['share']:.1%} ({p['lo']:.1%}-{p['hi']:.1%})" for p in pts
        )
    fast = [p for p in pts if p["share"] >= 0.9]
    if not fast:
        return [f"{where}: {said}; no D tried keeps 90%."]
    least = fast[0]["overlap"]
    c = costs.get(least)
    if least == 0:
        cost = "1f1b itself, the exact schedule: no loss cost"
    elif c is None:
        cost = "its loss cost was not run"
    else:
        lo, hi = c["ci95_pct"]
        ok = "both goals met" if c["cost_pct"] <= 1.0 else "the loss goal missed"
        cost = f"its rule costs {c['cost_pct']:+.2f}% (95% CI [{lo:+.2f}, {hi:+.2f}]): {ok}"
    return [f"{where}: {said}. The least D that keeps 90% is {least}; {cost}."]


def plot(rows, costs, path: Path, setting: dict[str, Any], rounds=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.2))
    series = [("1f1b", True, "C0"), ("1f1b", False, "C0"), ("overlapped", True, "C1")]
    series.append(("overlapped", False, "C1"))
    for schedule, fixed, color in series:
        pts = sorted(
            (latency_s(r["link"]) * 1e3, r["tokens_per_s"], r["analytic"]["s_per_step"])
            for r in rows
            if r["schedule"] == schedule
            and not r.get("sweep")
            and not r.get("baseline")
            and ((r["window"] > 0) == fixed or r["link"] == "none")
        )
        if not pts:
            continue
        name = schedule + (" (least window)" if fixed else " (window sized)")
        xs, ys, model = zip(*pts, strict=True)
        style = {"marker": "s", "ls": ":", "alpha": 0.6} if fixed else {"marker": "o"}
        ax.plot(xs, ys, color=color, label=f"{name}, measured", **style)
        tps = [setting["tokens_per_step"] / m for m in model]
        if not fixed:
            ax.plot(xs, tps, ls="--", color=color, lw=1, label=f"{name}, model")
    ax.set(
        xlabel="one-way link latency (ms), 100 Mbit/s",
        ylabel="tokens / s",
        title=f"{setting['stages']} stages x 1 replica, d={setting['d_model']}",
        ylim=(0, None),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ds = sorted(costs)
    if ds:
        means = [costs[d]["cost_pct"] for d in ds]
        errs = [[m - costs[d]["ci95_pct"][0] for d, m in zip(ds, means, strict=True)]]
        errs.append([costs[d]["ci95_pct"][1] - m for d, m in zip(ds, means, strict=True)])
        bx.errorbar(ds, means, yerr=errs, marker="o", capsize=4, color="C1")
        bx.axhline(1.0, color="grey", ls=":", lw=1, label="the 1% goal")
        bx.axhline(0.0, color="black", lw=0.5)
        bx.set(
            xlabel=f"overlap D (of {setting['microbatches']} microbatches)",
            ylabel="val loss vs 1f1b (%), 95% CI",
            title=f"loss cost, {setting['loss_steps']} steps, paired seeds",
        )
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    pts = frontier(rows, rounds)
    if pts:
        xs = [p["overlap"] for p in pts]
        ys = [100 * p["share"] for p in pts]
        err = [[y - 100 * p["lo"] for y, p in zip(ys, pts, strict=True)]]
        err.append([100 * p["hi"] - y for y, p in zip(ys, pts, strict=True)])
        what = "speed, median and range" if rounds else "speed"
        cx.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color="C1", label=what)
        cx.axhline(90, color="grey", ls=":", lw=1, label="the 90% goal")
        cx.set(
            xlabel="overlap D (0: 1f1b)",
            ylabel="% of no-latency tokens/s",
            title=f"the trade-off at {GOAL_LINK} (window sized)",
        )
        cx.grid(alpha=0.3)
        kx = cx.twinx()
        ds = [d for d in xs if d in costs]
        kx.plot(ds, [costs[d]["cost_pct"] for d in ds], marker="s", ls="--", color="C2")
        kx.set_ylabel("val loss vs 1f1b (%)", color="C2")
        cx.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
