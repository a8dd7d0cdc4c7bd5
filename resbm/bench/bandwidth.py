"""`resbm bench bandwidth`: throughput of the same 4-stage pipeline, ResBM 128x vs uncompressed
(compression 1), over emulated WAN links (resbm.wan: every inter-stage connection through a
shaping proxy, each direction on its own).

Each cell is a fresh `resbm simulate` swarm (a coordinator and one real node process per stage)
for the same steps; tokens/s is measured on the last stage over the steps after the warm-up.
Beside each measurement, the analytic costs of a step: the bytes one boundary carries each way
over the link's rate, and the latency the exact (flushed) schedule must wait out per step,
2 (S - 1) one-way delays, against the compute time the nodes measured.

`--schedules 1f1b overlapped` runs each cell on both schedules (#11): the overlapped one with
the overlap sized per link from the same compression's loopback run (schedule.size_overlap: the
microbatches that fill 2 (S - 1) one-way delays). `resbm bench latency` measures what it buys
where latency, not compute, is the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resbm.bench import add_device_args, add_model_args, add_out_args, out_path, say_where

LINKS = ["none", "1000mbit:40ms", "80mbit:40ms", "10mbit:40ms"]
FAST = "1000mbit:40ms"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bandwidth",
        help="tokens/s over emulated links: ResBM 128x vs uncompressed, 4 stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--links", nargs="+", default=LINKS, metavar="LINK", help="`none` or R:L[:J]")
    add_model_args(
        p,
        stages=4,
        steps=14,
        d_model=256,
        n_layers=4,
        n_heads=4,
        seq_len=128,
        batch_size=16,
        microbatches=4,
        compression=[128, 1],
        wire_codec="bf16",
    )
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the rates")
    p.add_argument(
        "--schedules",
        nargs="+",
        default=["1f1b"],
        choices=["1f1b", "overlapped"],
        help="pipeline schedules, one run each (default 1f1b)",
    )
    p.add_argument("--quick", action="store_true", help="d=128, T=64, 10 steps: a few minutes")
    add_out_args(p, "bandwidth[-quick]")
    add_device_args(p)
    p.set_defaults(handler=run)


def _setting(args) -> dict[str, Any]:
    if args.quick:
        args.d_model, args.n_layers, args.seq_len, args.steps, args.warmup = 128, 4, 64, 10, 3
    return {
        "stages": args.stages,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "microbatches": args.microbatches,
        "tokens_per_step": args.batch_size * args.microbatches * args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "wire_codec": args.wire_codec,
        "threads_per_node": 1,
    }


def cell(
    args, compression: int, link: str, schedule: str = "1f1b", overlap: int = 0
) -> dict[str, Any]:
    """One swarm, one link: steady-state rate and what each step cost."""
    from resbm.simulate import SimulateConfig, Swarm

    model = {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "seq_len": args.seq_len,
        "n_stages": args.stages,
        "compression": compression,
    }
    with tempfile.TemporaryDirectory(prefix="resbm-bandwidth-") as tmp:
        cfg = SimulateConfig(
            device=args.device,
            precision=args.precision,
            model=model,
            steps=args.steps,
            batch_size=args.batch_size,
            microbatches=args.microbatches,
            threads=1,
            wire_codec=args.wire_codec,
            workdir=Path(tmp),
            eval_batches=1,
            fixed_stages=True,
            link=link,
            schedule=schedule,
            overlap=overlap if schedule == "overlapped" else None,
        )
        swarm = Swarm(cfg, Path(tmp))
        result = swarm.run(progress=False)
        if not result["ok"]:
            raise RuntimeError(f"{link} x{compression}: {result['error']}")
        s_per_step, compute = steady_rate(swarm, args.stages, args.warmup)
    S = args.stages
    per_boundary_way = result["wire_bytes_per_step"] / (2 * (S - 1))
    row: dict[str, Any] = {
        "compression": compression,
        "schedule": schedule,
        "overlap": overlap if schedule == "overlapped" else 0,
        "link": link,
        "tokens_per_s": cfg.tokens_per_step / s_per_step,
        "s_per_step": s_per_step,
        "bytes_per_step": result["wire_bytes_per_step"],
        "bytes_per_boundary_each_way": per_boundary_way,
        "compute_s_per_step": max(compute),  # the busiest stage
        "final_loss": result["train_loss"],
    }
    if link != "none":
        from resbm.wan import LinkSpec

        spec = LinkSpec.parse(link)
        row["analytic_transfer_s"] = per_boundary_way / spec.bytes_per_s
        row["analytic_latency_s"] = 2 * (S - 1) * spec.latency_s
        row["link_stats"] = result["link"]
    else:
        row["analytic_transfer_s"] = row["analytic_latency_s"] = 0.0
    return row


def steady_rate(swarm, stages: int, warmup: int) -> tuple[float, list[float]]:
    """A finished swarm's seconds a step on the last stage after `warmup` steps, and each
    node's compute seconds a step over the same steps."""
    from node.events import read_events

    last = next(p for p in swarm.nodes if p.stage == stages - 1)
    steps = [e for e in read_events(last.events) if e["event"] == "step"]
    first, end = steps[warmup - 1], steps[-1]
    n = len(steps) - warmup
    compute = []
    for p in swarm.nodes:
        ev = [e for e in read_events(p.events) if e["event"] == "step"]
        compute.append((ev[-1]["compute_s"] - ev[warmup - 1]["compute_s"]) / n)
    return (end["time"] - first["time"]) / n, compute


def check_links(links: list[str]) -> str | None:
    """Why a --links value is refused (its error names the flag), or None."""
    from resbm.wan import LinkSpec

    try:
        for link in links:
            if link != "none":
                LinkSpec.parse(link)
    except ValueError as err:
        return str(err)
    return None


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's tokens/s over its compression's and schedule's fast-link and loopback
    rows (rows from before #11 have no schedule: 1f1b)."""
    by = {(r["compression"], r.get("schedule", "1f1b"), r["link"]): r for r in rows}
    for r in rows:
        c, s = r["compression"], r.get("schedule", "1f1b")
        fast, none = by.get((c, s, FAST)), by.get((c, s, "none"))
        r["vs_fast_link"] = r["tokens_per_s"] / fast["tokens_per_s"] if fast else None
        r["vs_none"] = r["tokens_per_s"] / none["tokens_per_s"] if none else None


def table(rows: list[dict[str, Any]], setting: dict[str, Any]) -> str:
    s = setting
    lines = [
        f"{s['stages']} stages, d={s['d_model']}, {s['n_layers']} layers, {s['microbatches']} "
        f"microbatches of {s['batch_size']}x{s['seq_len']} tokens a step, "
        f"wire {s['wire_codec']}, 1 thread a node; rates over steps {s['warmup']}..{s['steps']}",
        "",
    ]
    head = (
        f"{'compr':>5} {'schedule':>13} {'link':>14} {'tok/s':>7} {'vs 1000mbit:40ms':>16} "
        f"{'vs none':>7} "
        f"{'s/step':>7} {'compute':>7} {'bytes/bnd/way':>13} {'transfer':>8} {'latency':>7}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        fast = f"{r['vs_fast_link']:.1%}" if r["vs_fast_link"] is not None else "-"
        none = f"{r['vs_none']:.1%}" if r["vs_none"] is not None else "-"
        sched = r.get("schedule", "1f1b") + (
            f" D={r['overlap']}" if r.get("schedule", "1f1b") == "overlapped" else ""
        )
        lines.append(
            f"{r['compression']:>5} {sched:>13} {r['link']:>14} {r['tokens_per_s']:>7.0f} "
            f"{fast:>16} "
            f"{none:>7} {r['s_per_step']:>7.3f} {r['compute_s_per_step']:>7.3f} "
            f"{r['bytes_per_boundary_each_way']:>13,.0f} {r['analytic_transfer_s']:>8.3f} "
            f"{r['analytic_latency_s']:>7.3f}"
        )
    lines.append(
        "(seconds a step. compute: the busiest stage's torch time. transfer: one boundary's "
        "bytes each way / rate; latency: 2(S-1) one-way delays, what a flushed step waits out)"
    )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """What the numbers say, in words, for the log and the JSON."""
    out = []
    by = {(r["compression"], r["link"]): r for r in rows if r.get("schedule", "1f1b") == "1f1b"}
    ov = {
        (r["compression"], r["link"]): r for r in rows if r.get("schedule", "1f1b") == "overlapped"
    }
    slow = by.get((128, "10mbit:40ms"))
    if slow and slow["vs_fast_link"] is not None:
        ok = "meets" if slow["vs_fast_link"] >= 0.9 else "misses"
        out.append(
            f"ResBM 128x at 10mbit:40ms keeps {slow['vs_fast_link']:.1%} of its 1000mbit:40ms "
            f"speed ({ok} the 90% goal)."
        )
    fast = by.get((128, FAST))
    if fast and fast["vs_none"] is not None:
        cost = (
            f"loses {1 - fast['vs_none']:.1%} to it"
            if fast["vs_none"] < 1
            else "shows no loss beyond run-to-run noise"
        )
        out.append(
            f"ResBM 128x at 1000mbit:40ms runs at {fast['vs_none']:.1%} of loopback. What a 40 ms "
            f"link can cost it is latency, not bandwidth: {fast['analytic_latency_s']:.2f} s of "
            f"delays a step against {fast['analytic_transfer_s'] * 1e3:.2f} ms of transfer; this "
            f"run {cost}."
        )
    plain = by.get((1, "10mbit:40ms"))
    if plain and plain["vs_fast_link"] is not None and slow:
        out.append(
            f"Uncompressed at 10mbit:40ms keeps {plain['vs_fast_link']:.1%} of its fast-link "
            f"speed; ResBM there is {slow['tokens_per_s'] / plain['tokens_per_s']:.2f}x faster."
        )
    for (c, link), r in sorted(ov.items()):
        base = by.get((c, link))
        if link == "none" or base is None:
            continue
        out.append(
            f"{'Uncompressed' if c == 1 else f'ResBM {c}x'} at {link}, overlapped (D="
            f"{r['overlap']}): {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the exact "
            "schedule's tokens/s."
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path, setting: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resbm.wan import LinkSpec

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = sorted(
        {(r["compression"], r.get("schedule", "1f1b")) for r in rows}, key=lambda x: (-x[0], x[1])
    )
    for i, (c, sched) in enumerate(series):
        color = f"C{i}"
        name = ("uncompressed" if c == 1 else f"ResBM {c}x") + f", {sched}"
        pts = sorted(
            (LinkSpec.parse(r["link"]).rate_bps / 1e6, r["tokens_per_s"])
            for r in rows
            if (r["compression"], r.get("schedule", "1f1b")) == (c, sched) and r["link"] != "none"
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            links = [LinkSpec.parse(r["link"]) for r in rows if r["link"] != "none"]
            delays = sorted({f"{spec.latency_s * 1e3:g} ms" for spec in links})
            ax.plot(xs, ys, marker="o", color=color, label=f"{name}, {'/'.join(delays)} links")
        for r in rows:
            if (r["compression"], r.get("schedule", "1f1b")) == (c, sched) and r["link"] == "none":
                ax.axhline(r["tokens_per_s"], color=color, ls="--", lw=1, label=f"{name}, loopback")
    ax.set_xscale("log")
    ax.set(
        xlabel="link bandwidth, each direction (Mbit/s)",
        ylabel="tokens / s",
        title=f"{setting['stages']}-stage pipeline, d={setting['d_model']}, {_cpus()} CPU cores",
        ylim=(0, None),
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from resbm.wan import LinkSpec

    if (err := check_links(args.links)) is not None:
        print(f"bench bandwidth: {err}", file=sys.stderr)
        return 2
    setting = _setting(args)
    if args.warmup < 1 or args.steps <= args.warmup + 1:
        print("bench bandwidth: need --warmup >= 1 and --steps > --warmup + 1", file=sys.stderr)
        return 2
    out = out_path(args, "bandwidth-quick" if args.quick else "bandwidth")
    say_where("bandwidth", out)
    rows, t0 = [], time.monotonic()
    from node.protocol.schedule import size_overlap

    links = list(args.links)
    if "overlapped" in args.schedules:  # none first: its speed sizes the overlap per link
        links = ["none", *[link for link in links if link != "none"]]
    cells = [(c, s, link) for c in args.compression for link in links for s in args.schedules]
    for i, (c, schedule, link) in enumerate(cells, 1):
        overlap = 0
        if schedule == "overlapped" and link != "none":  # sized by the loopback run's speed
            base = next(r for r in rows if (r["compression"], r["link"]) == (c, "none"))
            s_per_mb = base["s_per_step"] / args.microbatches
            drain = 2 * (args.stages - 1) * LinkSpec.parse(link).latency_s
            overlap = size_overlap(drain, s_per_mb, args.microbatches)
        print(
            f"[{i}/{len(cells)}] compression {c}, {schedule}, link {link} "
            f"({time.monotonic() - t0:.0f} s in)",
            file=sys.stderr,
            flush=True,
        )
        rows.append(cell(args, c, link, schedule, overlap))
    order = {"c": args.compression, "link": args.links, "s": args.schedules}
    rows = sorted(  # the order asked; a loopback run made only to size D is left out
        (r for r in rows if r["link"] in args.links),
        key=lambda r: (
            order["c"].index(r["compression"]),
            order["link"].index(r["link"]),
            order["s"].index(r["schedule"]),
        ),
    )
    ratios(rows)
    print(table(rows, setting))
    words = verdict(rows)
    for line in words:
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": _cpus(), "platform": platform.platform()}
    doc = {"setting": setting, "machine": machine, "verdict": words, "runs": rows}
    out.write_text(json.dumps(doc, indent=1))
    png = out.with_suffix(".png")
    plot(rows, png, setting)
    print(f"wrote {out} and {png}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
