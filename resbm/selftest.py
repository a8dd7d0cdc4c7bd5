"""`resbm selftest protocol`: seeded fault scenarios on the deterministic in-process swarm
(node/protocol/harness.py), each checked against the reference trainer. Scenario i of a run
uses seed `--seed + i`, so a failing one replays alone with `--seed THAT --scenarios 1`.
The last line of `--json` output is {"scenarios", "failures", "seconds", "failed_seeds"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "selftest",
        help="deterministic protocol scenarios (kills, flaps, drains) against the reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = what.add_parser("protocol", help="run seeded scenarios of the stage protocol")
    q.add_argument("--scenarios", type=int, default=100, help="how many (default 100)")
    q.add_argument("--seed", type=int, default=0, help="the first scenario's seed")
    q.add_argument(
        "--faults",
        default=None,
        help="fault families, comma-separated: kill, flap, stop, partial (rounds that finish "
        "for some members only), join; default all",
    )
    q.add_argument(
        "--schedule",
        choices=["1f1b", "overlapped"],
        default="1f1b",
        help="the pipeline schedule; overlapped draws one or two replicas a stage, joins only "
        "into one, and 1-3 faults (default 1f1b)",
    )
    q.add_argument(
        "--least-window",
        action="store_true",
        help="stage 0's window fixed at the schedule's least (S, or S + D), as scenarios ran "
        "before protocol 0.13 (default: sized at run time, node/protocol/window.py)",
    )
    q.add_argument("--json", action="store_true", help="one JSON line per scenario, then a total")
    q.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes (default: one per CPU core; -v runs in one)",
    )
    q.add_argument("-v", "--verbose", action="store_true", help="the machines' log lines too")
    q.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from node.protocol.scenarios import FAMILIES, run_one

    default = ",".join(FAMILIES)
    families = tuple(f.strip() for f in (args.faults or default).split(",") if f.strip())
    if unknown := set(families) - set(FAMILIES):
        raise ValueError(f"unknown --faults {sorted(unknown)}: use some of {list(FAMILIES)}")
    if args.scenarios < 1:
        raise ValueError("--scenarios must be at least 1")
    if args.jobs < 0:
        raise ValueError("--jobs must be 0 (one per core) or more")
    jobs = 1 if args.verbose else min(args.jobs or os.cpu_count() or 1, args.scenarios)
    _setup(args.verbose)
    t0, failed = time.monotonic(), []
    seeds = range(args.seed, args.seed + args.scenarios)
    with contextlib.ExitStack() as stack:
        if jobs > 1:  # spawn: a forked child would inherit torch's thread pools
            pool = stack.enter_context(
                ProcessPoolExecutor(jobs, get_context("spawn"), _setup, (False,))
            )
            n = len(seeds)
            least = [args.least_window] * n
            outs = pool.map(run_one, seeds, [families] * n, [args.schedule] * n, least, chunksize=4)
        else:
            outs = (run_one(seed, families, args.schedule, args.least_window) for seed in seeds)
        failed, slow = _report(args, families, seeds, outs)
    seconds = time.monotonic() - t0
    if not args.json:
        print(file=sys.stderr)
        print(f"{args.scenarios} scenarios, {len(failed)} failures, {seconds:.1f} s")
    total = {"scenarios": args.scenarios, "failures": len(failed), "seconds": round(seconds, 1)}
    # liveness, not correctness: scenarios where a recovery waited out adopt_wait_s for a
    # report that never came (in a real swarm, a stall of that long)
    total["timeouts"] = len(slow)
    print(json.dumps({**total, "failed_seeds": failed[:100], "timeout_seeds": slow[:100]}))
    return 1 if failed else 0


def _setup(verbose: bool) -> None:
    """Each process that runs scenarios (this one, or a worker)."""
    import torch

    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead (3x slower)


def _report(args, families, seeds, outs) -> tuple[list[int], list[int]]:
    failed, slow = [], []
    for i, (seed, out) in enumerate(zip(seeds, outs, strict=True)):
        replay = (
            f"resbm selftest protocol --seed {seed} --scenarios 1 --faults {','.join(families)}"
            + (f" --schedule {args.schedule}" if args.schedule != "1f1b" else "")
        )
        if args.json:
            row = {"seed": seed, "shape": out.shape, "faults": out.faults, "ok": out.ok}
            row |= {"problems": out.problems, "max_diff": out.max_diff, "timeouts": out.timeouts}
            print(json.dumps(row))
        elif not out.ok:
            print(f"FAIL seed {seed} ({out.shape}; {'; '.join(out.faults) or 'no faults'}):")
            for problem in out.problems[:6]:
                print(f"  {problem}")
            print(f"  replay: {replay} -v")
        if not out.ok:
            failed.append(seed)
        if out.timeouts:
            slow.append(seed)
        if not args.json:
            print(f"\r{i + 1}/{args.scenarios} scenarios, {len(failed)} failed", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
    return failed, slow
