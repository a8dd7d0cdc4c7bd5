"""`resbm bench latency`: what link latency costs the exact schedule and the overlapped one (#11).

A 4-stage swarm, one replica a stage, a model small enough that a step here takes a few hundred
milliseconds, as a stage's share of a step does on a GPU: then round trips, not compute, decide
the step. Every inter-stage connection crosses an emulated link (resbm.wan); each cell is a fresh
`resbm simulate` swarm, its tokens/s measured on the last stage after the warm-up steps.

- `1f1b` drains at every step: the step's last gradient must come back to stage 0 before the
  next step starts, 2 (S-1) one-way delays a step; and a window of one microbatch a stage in
  flight would also cap the rate inside a step at S microbatches a round trip.
- `overlapped` begins the next step's first D microbatches before the update (node/trainer.py).
  D is sized from the measured compute time and the round trip (schedule.size_overlap): the
  microbatches stage 0 can start while the last one's gradient comes back, 2 (S-1) L at the
  `none` run's time a microbatch, at most a step's.
- Each schedule runs twice a link: at its least window (S, or S + D: `window` in a run), and
  with the window sized at run time from the measured round trip (node/protocol/window.py; the
  default; `window_used` is its median over the measured steps). Side by side they tell what the
  window buys from what the drain (1f1b) or the overlap costs.

The loss cost is the overlapped rule's against 1f1b on the same tokens, paired by seed, from the
reference trainer (an fp32 swarm equals it to 1e-5: tests/swarm/test_overlapped.py), for each D
the links needed, over --loss-steps steps of the same model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from node.config import TrainConfig
from resbm.bench import add_device_args, add_model_args, add_out_args, out_path, say_where
from resbm.bench.bandwidth import _cpus, check_links, steady_rate
from resbm.bench.latency_loss import costs_of
from resbm.bench.latency_report import GOAL_LINK, latency_s, plot, table, trade_off, verdict

LINKS = ["none", "100mbit:25ms", "100mbit:50ms", "100mbit:100ms"]
PREDICT_SCALE = TrainConfig.model_fields["predict_scale"].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latency",
        help="tokens/s over latency, 1f1b vs overlapped, and the overlapped rule's loss cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--links", nargs="+", default=LINKS, metavar="LINK", help="`none` or R:L[:J]")
    add_model_args(
        p,
        stages=4,
        steps=16,
        d_model=128,
        n_layers=4,
        n_heads=4,
        seq_len=64,
        batch_size=4,
        microbatches=16,
        compression=32,
        wire_codec="bf16",
    )
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the rates")
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        metavar="N",
        help=f"then run the trade-off at {GOAL_LINK} N more times side by side (a loopback run, "
        "1f1b and every D, each against its round's loopback run): one run's noise is several "
        "points here",
    )
    p.add_argument("--overlap", type=int, help="D for every link (default: sized per link)")
    p.add_argument(
        "--plan",
        nargs="+",
        metavar="LINK=D",
        default=[],
        help="D for these links (the rest sized): an earlier run's plan, to reuse its loss runs",
    )
    p.add_argument(
        "--goal-overlaps",
        nargs="*",
        type=int,
        default=[3, 4],
        metavar="D",
        help=f"more D tried at {GOAL_LINK} (window sized): the speed/loss trade-off there",
    )
    p.add_argument("--loss-steps", type=int, default=300, help="steps of each loss run")
    p.add_argument("--loss-seeds", type=int, default=3, help="paired seeds of the loss cost")
    p.add_argument(
        "--loss-from",
        type=Path,
        metavar="JSON",
        help="reuse the loss runs of an earlier latency JSON of the same setting (they do not "
        "depend on the links; seed 0 of 1f1b and of every D is run again and must come out bit "
        "for bit: the same code, on the same kind of machine); D values it lacks are run",
    )
    p.add_argument(
        "--loss-only",
        nargs="+",
        type=int,
        metavar="D",
        help="only the loss runs of these D against 1f1b (no swarm): a JSON --loss-from takes",
    )
    p.add_argument("--quick", action="store_true", help="2 links, 8 steps, 60-step loss runs")
    add_out_args(p, "latency[-quick]")
    add_device_args(p)
    p.set_defaults(handler=run)


def _setting(args) -> dict[str, Any]:
    if args.quick:
        args.links = [link for link in args.links if link in ("none", GOAL_LINK)] or args.links
        args.steps, args.warmup, args.loss_steps, args.loss_seeds = 8, 3, 60, 2
    return {
        "stages": args.stages,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "microbatches": args.microbatches,
        "compression": args.compression,
        "tokens_per_step": args.batch_size * args.microbatches * args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "wire_codec": args.wire_codec,
        "threads_per_node": 1,
        "loss_steps": args.loss_steps,
        "predict_scale": PREDICT_SCALE,  # the overlapped rule of the loss runs (the default)
    }


def _model(args) -> dict[str, Any]:
    return {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "seq_len": args.seq_len,
        "n_stages": args.stages,
        "compression": args.compression,
    }


def cell(args, schedule: str, link: str, overlap: int, window: int) -> dict[str, Any]:
    """One swarm on one link: its steady rate."""
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-latency-") as tmp:
        cfg = SimulateConfig(
            device=args.device,
            precision=args.precision,
            model=_model(args),
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
            max_in_flight=window,
        )
        swarm = Swarm(cfg, Path(tmp))
        result = swarm.run(progress=False)
        if not result["ok"]:
            raise RuntimeError(f"{schedule} on {link}: {result['error']}")
        s_per_step, compute = steady_rate(swarm, args.stages, args.warmup)
        used, rtt = windows(swarm, args.warmup)
    return {
        "schedule": schedule,
        "link": link,
        "overlap": overlap if schedule == "overlapped" else 0,
        "window": window,
        "window_used": used,
        "round_trip_s": rtt,
        "tokens_per_s": cfg.tokens_per_step / s_per_step,
        "s_per_step": s_per_step,
        "compute_s_per_step": max(compute),  # the busiest stage's torch time
    }


def windows(swarm, warmup: int) -> tuple[float, float | None]:
    """Stage 0's window over the steps after `warmup` (median), and its least round trip."""
    from node.events import read_events

    first = next(p for p in swarm.nodes if p.stage == 0)
    steps = [e for e in read_events(first.events) if e["event"] == "step"][warmup:]
    rtt = [e["round_trip_s"] for e in steps if e.get("round_trip_s") is not None]
    return statistics.median(e["window"] for e in steps), min(rtt) if rtt else None


def side_by_side(args, ds: list[int], note) -> list[dict[str, Any]]:
    """--rounds: the goal link's trade-off again, round after round: each round runs the
    loopback swarm, then 1f1b (D = 0) and every D at the goal link (window sized), and each
    share is against that round's own loopback run, as this machine's speed drifts between
    rounds more than within one."""
    out = []
    for i in range(args.rounds):
        note(f"round {i + 1}/{args.rounds} at {GOAL_LINK}: loopback, then D in {ds}")
        base = cell(args, "1f1b", "none", 0, 0)["s_per_step"]
        for d in ds:
            r = cell(args, "1f1b" if d == 0 else "overlapped", GOAL_LINK, d, 0)
            share = base / r["s_per_step"]
            out.append({"round": i, "overlap": d, "s_per_step": r["s_per_step"],
                        "none_s_per_step": base, "window_used": r["window_used"],
                        "vs_none": share})  # fmt: skip
    return out


def parse_plan(items: list[str], links: list[str], microbatches: int) -> dict[str, int]:
    """--plan LINK=D ...: D fixed for those links."""
    out = {}
    for item in items:
        link, _, d = item.rpartition("=")
        if link not in links or not d.isdigit() or int(d) > microbatches:
            raise ValueError(
                f"--plan {item!r}: want LINK=D with LINK one of --links and D within "
                f"0..--microbatches ({microbatches})"
            )
        out[link] = int(d)
    return out


def analytic(
    base_s: float, M: int, S: int, link: str, overlap: int, window: float, schedule: str
) -> dict[str, float]:
    """The model beside the measurements. r = the no-latency 1F1B step over its M + S - 1
    slots; a microbatch's round trip is S r of compute plus the fill and the drain,
    d = 2 (S-1) L. With K in flight, stage 0 dispatches one every t = max(r, (S r + d) / K):
    the compute, or the window over the round trip. 1f1b: M dispatches, then the last one's
    round trip, T = (M-1) t + S r + d; the next step waits for all of it. overlapped: the next
    step's D microbatches go out during that wait, T = (M-1) t + max(t, S r + d - D t): only
    what D does not cover is lost. The round is 0 here: one replica a stage averages with
    nobody."""
    r, d = base_s / (M + S - 1), 2 * (S - 1) * latency_s(link)
    K = window  # the run's: fixed, or the median of the one sized at run time
    t = max(r, (S * r + d) / K)
    wait = S * r + d
    if schedule == "overlapped":
        wait = max(t, wait - overlap * t)
    T = (M - 1) * t + wait
    return {"drain_s": d, "window": K, "s_per_mb": t, "wait_s": wait, "s_per_step": T}


def group_none(rows: list[dict[str, Any]], group: int, key: str) -> list[float]:
    """`key` of the loopback runs a run is measured against: its link's own (the one just
    before its runs), or for the loopback link itself its two runs, 1f1b and overlapped at
    D=0, which are the same schedule (their difference is the noise)."""
    return [r[key] for r in rows if r["link"] == "none" and r["group"] == group] or [
        r[key] for r in rows if r["link"] == "none"
    ]


def shares(rows: list[dict[str, Any]]) -> float | None:
    """Each run's tokens/s over the no-latency rate of its group (group_none); returns the
    mean of every loopback run's."""
    for r in rows:
        base = statistics.fmean(group_none(rows, r["group"], "tokens_per_s"))
        r["vs_none"] = r["tokens_per_s"] / base
    none = [r["tokens_per_s"] for r in rows if r["link"] == "none"]
    return statistics.fmean(none) if none else None


def loss_only(args: argparse.Namespace, setting: dict[str, Any]) -> int:
    """--loss-only: the paired loss costs alone (the reference trainer: minutes, not a swarm)."""
    if any(not 0 < d <= args.microbatches for d in args.loss_only):
        print("bench latency: --loss-only takes D within 1..--microbatches", file=sys.stderr)
        return 2
    out = out_path(args, "latency-loss-quick" if args.quick else "latency-loss")
    say_where("latency", out)
    overlaps = sorted(set(args.loss_only))
    costs = costs_of(args, setting, _model(args), overlaps)
    for d in overlaps:
        lo, hi = costs[d]["ci95_pct"]
        print(f"loss cost at D={d}: {costs[d]['cost_pct']:+.2f}% (95% CI [{lo:+.2f}, {hi:+.2f}])")
    doc = {
        "setting": setting,
        "machine": {"cpus": _cpus(), "platform": platform.platform()},
        "loss_seeds": list(range(args.loss_seeds)),
        "loss_from": str(args.loss_from) if args.loss_from else None,
        "loss_costs": [costs[d] for d in overlaps],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from node.protocol.schedule import size_overlap

    if (err := check_links(args.links)) is not None:
        print(f"bench latency: {err}", file=sys.stderr)
        return 2
    setting = _setting(args)
    if args.warmup < 1 or args.steps <= args.warmup + 1:
        print("bench latency: need --warmup >= 1 and --steps > --warmup + 1", file=sys.stderr)
        return 2
    try:
        fixed = parse_plan(args.plan, args.links, args.microbatches)
    except ValueError as err:
        print(f"bench latency: {err}", file=sys.stderr)
        return 2
    bad = [d for d in [args.overlap, *args.goal_overlaps] if d is not None]
    if any(not 0 <= d <= args.microbatches for d in bad):
        print(
            "bench latency: --overlap and --goal-overlaps must be within 0..--microbatches",
            file=sys.stderr,
        )
        return 2
    if args.loss_only:
        return loss_only(args, setting)
    out = out_path(args, "latency-quick" if args.quick else "latency")
    say_where("latency", out)
    S, M, t0 = args.stages, args.microbatches, time.monotonic()

    def note(what: str) -> None:
        print(f"[{what}] ({time.monotonic() - t0:.0f} s in)", file=sys.stderr, flush=True)

    note("1f1b on loopback: the compute time a microbatch")
    base = cell(args, "1f1b", "none", 0, 0)
    s_per_mb = base["s_per_step"] / M
    home = args.links.index("none") if "none" in args.links else -1
    rows = [{**base, "group": home}]
    plan = {}
    for link in args.links:
        d = fixed.get(link, args.overlap)
        if d is None:
            d = size_overlap(2 * (S - 1) * latency_s(link), s_per_mb, M)
        plan[link] = d
    sweep = sorted(set(args.goal_overlaps) - {0, plan.get(GOAL_LINK)})
    for g, link in enumerate(args.links):
        d = plan[link]
        cells = [("overlapped", d, 0, False)]
        if link != "none":  # each schedule at its least window, then sized at run time
            cells = [("1f1b", 0, S, False), ("1f1b", 0, 0, False), ("overlapped", d, S + d, False)]
            cells += [("overlapped", d, 0, False)]
            cells += [("overlapped", x, 0, True) for x in (sweep if link == GOAL_LINK else [])]
            # the machine's speed drifts over a run by more than what is measured: each link's
            # runs are against a loopback run of their own, just before them
            note(f"1f1b on loopback again: the base of the {link} runs")
            rows.append({**cell(args, "1f1b", "none", 0, 0), "group": g, "baseline": True})
        for schedule, overlap, window, swept in cells:
            what = " (the trade-off at the goal link)" if swept else ""
            note(f"{schedule} D={overlap} window={window or 'sized'} on {link}{what}")
            r = {**cell(args, schedule, link, overlap, window), "group": g}
            rows.append({**r, "sweep": True} if swept else r)
    for r in rows:
        base_s = statistics.fmean(group_none(rows, r["group"], "s_per_step"))
        K = r["window"] or r["window_used"]
        r["analytic"] = analytic(base_s, M, S, r["link"], r["overlap"], K, r["schedule"])
    base_tps = shares(rows)
    rounds = []
    if args.rounds and GOAL_LINK in args.links:
        rounds = side_by_side(args, [0, *sorted({plan[GOAL_LINK], *sweep} - {0})], note)
    overlaps = sorted({d for d in plan.values() if d > 0} | {r["overlap"] for r in rows})
    overlaps = [d for d in overlaps if d > 0]
    note(f"loss runs: D in {overlaps} against 1f1b, {args.loss_seeds} seeds")
    costs = costs_of(args, setting, _model(args), overlaps)
    goal = plan.get(GOAL_LINK, overlaps[-1] if overlaps else 0)
    print(table(rows, setting))
    for d, c in costs.items():
        lo, hi = c["ci95_pct"]
        print(f"loss cost at D={d}: {c['cost_pct']:+.2f}% (95% CI [{lo:+.2f}, {hi:+.2f}])")
    words = verdict(rows, costs, goal) + trade_off(rows, costs, rounds)
    for line in words:
        print(line)
    doc = {
        "setting": setting,
        "machine": {"cpus": _cpus(), "platform": platform.platform()},
        "s_per_mb_measured": s_per_mb,
        "no_latency_tokens_per_s": base_tps,
        "overlap_by_link": plan,
        "runs": rows,
        "loss_cost_pct": costs[goal]["cost_pct"] if goal in costs else None,
        "loss_cost_ci95_pct": costs[goal]["ci95_pct"] if goal in costs else None,
        "loss_cost_overlap": goal,
        "loss_seeds": list(range(args.loss_seeds)),
        "loss_from": str(args.loss_from) if args.loss_from else None,
        "loss_costs": [costs[d] for d in overlaps],
        "analytic_model": " ".join(analytic.__doc__.split()),
        "goal_link_rounds": rounds,
        "verdict": words,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    png = out.with_suffix(".png")
    plot(rows, costs, png, setting, rounds)
    print(f"wrote {out} and {png}")
    return 0
