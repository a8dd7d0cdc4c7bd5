"""The loss side of `resbm bench latency`: the overlapped rule's val-loss cost against 1f1b,
paired by seed, from the reference trainer (a loss run has no link in it: an fp32 swarm equals
the reference to 1e-5, tests/swarm/test_overlapped.py), and an earlier run's costs reused.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
T95 |= {10: 2.23, 11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11}
T95 |= {18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06, 30: 2.04}  # Student's t, 97.5%, by df


def loss_run(model: dict, args: dict, schedule: str, overlap: int | None, seed: int) -> float:
    """One reference run's final val loss (in a worker process)."""
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    cfg = TrainConfig(
        model=model,
        steps=args["loss_steps"],
        batch_size=args["batch_size"],
        microbatches=args["microbatches"],
        eval_every=0,
        eval_batches=16,
        seed=seed,
        threads=1,
        schedule=schedule,
        overlap=overlap,
    )
    return ReferenceTrainer(cfg, progress=False).run()["val_loss"]


def loss_costs(
    args, model: dict[str, Any], overlaps: list[int], exact: list[float] | None = None
) -> dict[int, dict[str, Any]]:
    """Paired val-loss cost of each D against 1f1b, seeds 0..n-1, two runs at a time (`exact`:
    1f1b's val losses of those seeds, already run)."""
    plain = {"loss_steps": args.loss_steps, "batch_size": args.batch_size}
    plain["microbatches"] = args.microbatches
    jobs = [] if exact else [("1f1b", None, s) for s in range(args.loss_seeds)]
    jobs += [("overlapped", d, s) for d in overlaps for s in range(args.loss_seeds)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = {j: pool.submit(loss_run, model, plain, *j) for j in jobs}
        t0 = time.monotonic()
        for done, fut in enumerate(as_completed(futures.values()), 1):
            fut.result()
            print(
                f"  loss runs: {done}/{len(jobs)} ({time.monotonic() - t0:.0f} s in)",
                file=sys.stderr,
                flush=True,
            )
        val = {job: fut.result() for job, fut in futures.items()}
    val.update({("1f1b", None, seed): v for seed, v in enumerate(exact or [])})
    seeds = range(args.loss_seeds)
    return {
        d: paired(d, [val[("1f1b", None, s)] for s in seeds],
                  [val[("overlapped", d, s)] for s in seeds])
        for d in overlaps
    }  # fmt: skip


def t95(df: int) -> float:
    """The table's t at `df`, or at the nearest listed df below it: a wider interval, never a
    narrower one (past 30, t(30))."""
    return T95[max(k for k in T95 if k <= df)]


def paired(d: int, val_1f1b: list[float], val_overlapped: list[float]) -> dict[str, Any]:
    """D's cost: the mean of the per-seed differences (%), with a t interval."""
    diffs = [100 * (o / e - 1) for e, o in zip(val_1f1b, val_overlapped, strict=True)]
    mean = statistics.fmean(diffs)
    half = (
        t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        if len(diffs) > 1
        else float("nan")
    )
    return {
        "overlap": d,
        "cost_pct": mean,
        "ci95_pct": [mean - half, mean + half],
        "per_seed_pct": diffs,
        "val_1f1b": list(val_1f1b),
        "val_overlapped": list(val_overlapped),
    }


LOSS_KEYS = ("d_model", "n_layers", "n_heads", "seq_len", "stages", "compression", "batch_size")


def reused_costs(
    args, setting: dict[str, Any], model: dict[str, Any], overlaps: list[int]
) -> dict[int, dict]:
    """--loss-from: the earlier run's paired costs, if its setting is this one's, its seeds are
    0..n-1, every D was paired with the same 1f1b runs, and this code still gives them: 1f1b and
    every D are run again at seed 0 and must come out bit for bit (so: the same code, on the
    same kind of machine). A chain of reuses once paired 1f1b runs of an older model code with
    overlapped runs of a newer one."""
    if args.loss_from is None:
        return {}
    old = json.loads(args.loss_from.read_text())
    theirs, entries = old["setting"], old.get("loss_costs") or []
    keys = (*LOSS_KEYS, "microbatches", "loss_steps", "predict_scale")
    theirs = {"predict_scale": 1.0, **theirs}  # a file from before the setting: the whole update
    if any(theirs.get(k) != setting[k] for k in keys):
        raise SystemExit(f"bench latency: {args.loss_from} ran another setting: drop --loss-from")
    if old.get("loss_seeds") != list(range(args.loss_seeds)) or not entries:
        raise SystemExit(
            f"bench latency: {args.loss_from} has no loss runs of seeds 0..{args.loss_seeds - 1}:"
            " drop --loss-from, or set --loss-seeds to its count"
        )
    exact = entries[0]["val_1f1b"]
    if any(c["val_1f1b"] != exact for c in entries):
        raise SystemExit(
            f"bench latency: {args.loss_from} pairs its D with different 1f1b runs: "
            "drop --loss-from"
        )
    plain = {"loss_steps": args.loss_steps, "batch_size": args.batch_size}
    plain["microbatches"] = args.microbatches
    jobs = [("1f1b", None)] + [("overlapped", c["overlap"]) for c in entries]
    print(f"  checking {args.loss_from}'s runs still come out (seed 0)", file=sys.stderr)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        again = [pool.submit(loss_run, model, plain, s, d, 0) for s, d in jobs]
        got = [f.result() for f in again]
    stored = [exact[0]] + [c["val_overlapped"][0] for c in entries]
    if got != stored:
        raise SystemExit(
            f"bench latency: {args.loss_from}'s loss runs came from other code (seed 0 of "
            f"{[d or 0 for _, d in jobs]}: {got} now, {stored} there): drop --loss-from"
        )
    # every D it ran (the plot shows them), its cost from its runs (not the file's own figures)
    return {c["overlap"]: paired(c["overlap"], c["val_1f1b"], c["val_overlapped"]) for c in entries}


def costs_of(args, setting: dict[str, Any], model: dict[str, Any], overlaps: list[int]) -> dict:
    """Each D's paired cost: --loss-from's where it has them (checked), the rest run here
    against its 1f1b runs (or new ones)."""
    costs = reused_costs(args, setting, model, overlaps)
    missing = [d for d in overlaps if d not in costs]
    exact = next(iter(costs.values()))["val_1f1b"] if costs else None
    costs.update(loss_costs(args, model, missing, exact) if missing else {})
    return {d: costs[d] for d in sorted(costs)}
