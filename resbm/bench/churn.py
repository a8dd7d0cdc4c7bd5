"""`resbm bench churn`: goodput under churn. The same swarm (2 replicas per stage, every
inter-stage connection over an emulated `80mbit:40ms` link) runs twice, one after the other in
one command: once undisturbed, once with seeded chaos (a random replica SIGKILLed with its process
group every ~interval seconds, a replacement started a moment later that joins through the
coordinator and downloads its stage's state from a survivor).

The pair runs on each of `--schedules` (default both, #11): on the overlapped one a kill also
takes the next step's microbatches begun early, which its survivor redoes at the version they
ran at (benchmarks/README.md).

Goodput: tokens of *completed* steps a second, from the first step to the last. Also reported:
microbatches recomputed (work a dead node took with it, done again elsewhere) and lost (steps'
microbatches that no applied update covered: must be 0; the command fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resbm.bench import (
    add_device_args,
    add_model_args,
    add_out_args,
    out_path,
    say_where,
    setting_of,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "churn",
        help="goodput with seeded kills and rejoins vs none, 2 replicas a stage, 80mbit:40ms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--link",
        default="80mbit:40ms",
        help="emulated link of every inter-stage connection, RATE:LATENCY[:JITTER] "
        "(default 80mbit:40ms)",
    )
    # in two calls: the results file records the args in this order
    add_model_args(p, stages=2)
    p.add_argument("--replicas", type=int, default=2, help="nodes per stage (default 2)")
    add_model_args(
        p,
        steps=60,
        d_model=128,
        n_layers=2,
        seq_len=64,
        batch_size=8,
        microbatches=4,
        compression=32,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kills (default 0)")
    p.add_argument(
        "--interval", type=float, default=20.0, help="mean seconds between kills (default 20)"
    )
    p.add_argument(
        "--schedules",
        nargs="+",
        choices=["1f1b", "overlapped"],
        default=["1f1b", "overlapped"],
        help="pipeline schedules, a calm and a churned run each (default both)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=2,
        help="the overlapped schedule's D: microbatches of the next step begun early (default 2: "
        "half of the 4 a step; at 40 ms one way and 2 stages the round trip is about two "
        "microbatches' compute here)",
    )
    add_out_args(p, "churn")
    add_device_args(p)
    p.set_defaults(handler=run)


def one(args, chaos: bool, schedule: str = "1f1b") -> dict[str, Any]:
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-churn-") as tmp:
        cfg = SimulateConfig(
            device=args.device,
            precision=args.precision,
            model={
                "d_model": args.d_model,
                "n_layers": args.n_layers,
                "n_heads": 4,
                "seq_len": args.seq_len,
                "n_stages": args.stages,
                "compression": args.compression,
            },
            steps=args.steps,
            batch_size=args.batch_size,
            microbatches=args.microbatches,
            replicas=args.replicas,
            eval_batches=2,
            workdir=Path(tmp),
            link=args.link,
            chaos=chaos,
            chaos_seed=args.seed,
            chaos_interval_s=args.interval,
            schedule=schedule,
            overlap=args.overlap if schedule == "overlapped" else None,
        )
        swarm = Swarm(cfg, Path(tmp))
        r = swarm.run(progress=True)
        last = args.stages - 1
        times = sorted(
            {
                e["step"]: e["time"] for p in swarm.nodes for e in p.steps() if e["stage"] == last
            }.values()
        )
    if not r["ok"]:
        raise RuntimeError(f"{schedule}, {'chaos' if chaos else 'calm'} run failed: {r['error']}")
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "schedule": schedule,
        "overlap": args.overlap if schedule == "overlapped" else 0,
        "chaos": chaos,
        "link": args.link,
        "steps": r["steps"],
        "goodput_tokens_per_s": (len(times) - 1) * cfg.tokens_per_step / span,
        "nodes_killed": r["nodes_killed"],
        "rejoins": r["rejoins"],
        "microbatches_recomputed": r["microbatches_recomputed"],
        "microbatches_lost": r["microbatches_lost"],
        "final_loss": r["train_loss"],
        "val_loss": r["val_loss"],
        "wire_bytes_per_step": r["wire_bytes_per_step"],
    }


def run(args: argparse.Namespace) -> int:
    from resbm.wan import LinkSpec

    try:
        LinkSpec.parse(args.link)
    except ValueError as err:
        print(f"bench churn: {err}", file=sys.stderr)
        return 2
    if not 0 <= args.overlap <= args.microbatches:
        print("bench churn: --overlap must be within 0..--microbatches", file=sys.stderr)
        return 2
    out = out_path(args, "churn")
    say_where("churn", out)
    t0 = time.monotonic()
    rows = []
    for schedule in dict.fromkeys(args.schedules):
        pair = []
        for chaos in (False, True):
            name = f"{schedule}, {'chaos' if chaos else 'no churn'}"
            print(f"{name} ({time.monotonic() - t0:.0f} s in)", file=sys.stderr, flush=True)
            pair.append(one(args, chaos, schedule))
        calm, churn = pair
        churn["goodput_vs_no_churn"] = churn["goodput_tokens_per_s"] / calm["goodput_tokens_per_s"]
        calm["goodput_vs_no_churn"] = 1.0
        rows += pair
    print(table(rows, args))
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = setting_of(args)
    out.write_text(json.dumps({"setting": setting, "runs": rows}, indent=1))
    print(f"wrote {out}")
    lost = sum(r["microbatches_lost"] for r in rows)
    if lost:
        print(f"bench churn: {lost} microbatches LOST", file=sys.stderr)
        return 1
    return 0


def table(rows: list[dict[str, Any]], args) -> str:
    lines = [
        f"{args.stages} stages x {args.replicas} replicas, d={args.d_model}, {args.n_layers} "
        f"layers, {args.compression}x, {args.microbatches} microbatches of "
        f"{args.batch_size}x{args.seq_len} a step, {args.steps} steps, "
        f"every link {args.link}; kills: seed {args.seed}, mean every {args.interval:g} s",
        "",
    ]
    head = (
        f"{'schedule':>10} {'D':>2} {'run':>8} {'goodput tok/s':>13} {'vs calm':>7} "
        f"{'killed':>6} {'rejoins':>7} {'recomputed':>10} {'lost':>4} {'final loss':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['schedule']:>10} {r['overlap']:>2} "
            f"{'churn' if r['chaos'] else 'no churn':>8} {r['goodput_tokens_per_s']:>13.0f} "
            f"{r['goodput_vs_no_churn']:>7.1%} {r['nodes_killed']:>6} {r['rejoins']:>7} "
            f"{r['microbatches_recomputed']:>10} {r['microbatches_lost']:>4} "
            f"{r['final_loss']:>10.4f}"
        )
    return "\n".join(lines)
