"""`resbm bench overhead`: what the pipeline costs over running the same model in one process.

Side by side in one run: the reference trainer (all stages in this process) and a 2-stage swarm of
real node processes over loopback gRPC, same model, data and steps. For the swarm, each node's
step time is split into compute (torch), codec (encode/decode), transport (inside gRPC writes) and
waiting (idle until a neighbour's tensor arrives). Warm-up steps are left out of every average.
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
        "overhead",
        help="2-stage pipeline over loopback vs one process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # in two calls: the results file records the args in this order
    add_model_args(p, steps=20)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the averages")
    add_model_args(
        p,
        d_model=256,
        n_layers=4,
        seq_len=128,
        batch_size=16,
        microbatches=4,
        compression=[128, 1],
        wire_codec="bf16",
    )
    add_out_args(p, "overhead")
    add_device_args(p)
    p.set_defaults(handler=run)


def _model(args, compression: int) -> dict[str, Any]:
    return {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": 4,
        "seq_len": args.seq_len,
        "n_stages": 2,
        "compression": compression,
    }


def reference(args, compression: int, threads: int) -> float:
    """Seconds per step of the in-process reference trainer (after warm-up)."""
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    cfg = TrainConfig(
        schedule="1f1b",  # the exact rule, whatever RESBM_SCHEDULE says
        device=args.device,
        precision=args.precision,
        model=_model(args, compression),
        steps=args.steps,
        batch_size=args.batch_size,
        microbatches=args.microbatches,
        threads=threads,
        eval_every=0,
        eval_batches=1,
    )
    trainer = ReferenceTrainer(cfg, progress=False)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return sum(times[args.warmup :]) / len(times[args.warmup :])


def pipeline(args, compression: int) -> dict[str, Any]:
    from node.events import read_events
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-overhead-") as tmp:
        cfg = SimulateConfig(
            device=args.device,
            precision=args.precision,
            model=_model(args, compression),
            steps=args.steps,
            batch_size=args.batch_size,
            microbatches=args.microbatches,
            threads=1,
            wire_codec=args.wire_codec,
            workdir=Path(tmp),
            eval_batches=1,
        )
        swarm = Swarm(cfg, Path(tmp))
        result = swarm.run(progress=False)
        if not result["ok"]:
            raise RuntimeError(f"pipeline run failed: {result['error']}")
        per_stage = []
        for node in swarm.nodes:
            steps = [e for e in read_events(node.events) if e["event"] == "step"]
            first, last = steps[args.warmup - 1], steps[-1]
            n = len(steps) - args.warmup
            wall = (last["time"] - first["time"]) / n
            parts = {k: (last[k] - first[k]) / n for k in ("compute_s", "codec_s", "transport_s")}
            parts["wait_s"] = max(0.0, wall - sum(parts.values()))
            per_stage.append({"stage": node.stage, "step_s": wall, **parts})
        return {
            "step_s": max(s["step_s"] for s in per_stage),
            "stages": per_stage,
            "bytes_per_step": result["wire_bytes_per_step"],
            "wire_compression_vs_bf16": result["wire_compression_vs_bf16"],
        }


def run(args: argparse.Namespace) -> int:
    if args.steps <= args.warmup + 1:
        print("bench overhead: --steps must exceed --warmup + 1", file=sys.stderr)
        return 2
    out = out_path(args, "overhead")
    say_where("overhead", out)
    rows = []
    for c in args.compression:
        print(
            f"compression {c}: reference (1 and 2 threads), then the 2-process pipeline ...",
            file=sys.stderr,
        )
        row = {
            "compression": c,
            "reference_1thread_s": reference(args, c, 1),
            "reference_2threads_s": reference(args, c, 2),
            **pipeline(args, c),
        }
        rows.append(row)
    print(table(rows, args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": setting_of(args), "runs": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def table(rows: list[dict[str, Any]], args) -> str:
    lines = [
        f"2 stages, d={args.d_model}, {args.n_layers} layers, {args.microbatches} x "
        f"{args.batch_size}x{args.seq_len} tokens a step, wire {args.wire_codec}; "
        f"mean over steps {args.warmup}..{args.steps - 1}",
        "",
    ]
    head = (
        f"{'compr':>5} {'ref 1t':>8} {'ref 2t':>8} {'pipe':>8} {'stage':>5} {'compute':>8} "
        f"{'codec':>7} {'transp':>7} {'wait':>7} {'codec+tr %':>10} {'KB/step':>8}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        for s in r["stages"]:
            share = 100 * (s["codec_s"] + s["transport_s"]) / s["step_s"]
            lead = (
                f"{r['compression']:>5} {r['reference_1thread_s']:>8.3f} "
                f"{r['reference_2threads_s']:>8.3f} {r['step_s']:>8.3f}"
                if s["stage"] == 0
                else " " * 32
            )
            lines.append(
                f"{lead} {s['stage']:>5} {s['compute_s']:>8.3f} {s['codec_s']:>7.4f} "
                f"{s['transport_s']:>7.4f} {s['wait_s']:>7.3f} {share:>10.2f} "
                f"{r['bytes_per_step'] / 1e3:>8.1f}"
            )
    lines.append("(seconds per step; 'codec+tr %' = codec + transport share of that stage's step)")
    return "\n".join(lines)
