"""`resbm bench replicas`: what replicas and their averaging cost per step.

The same 2-stage swarm (a coordinator and real node processes over loopback) is run with 1 and
with 2 replicas per stage, same model, data and steps, side by side in one run. The table gives
seconds per step, the time one averaging round takes (hivemind matchmaking + all-reduce of the
stage's gradients), its share of a step, and the bytes the pipeline links carried. All the
processes share this machine's cores, so 2 replicas do not compute faster here: the point is
the averaging cost, not the speed-up a swarm of separate machines would see.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from resbm.bench import add_device_args, add_model_args, add_out_args, out_path, say_where


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replicas",
        help="seconds per step and averaging cost, 1 vs 2 replicas per stage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(
        p,
        steps=30,
        d_model=256,
        n_layers=4,
        seq_len=128,
        batch_size=16,
        microbatches=4,
        compression=128,
    )
    p.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1, 2],
        help="replicas per stage to compare, one swarm each (default 1 2)",
    )
    add_out_args(p, "replicas")
    add_device_args(p)
    p.set_defaults(handler=run)


def one(args, replicas: int) -> dict[str, Any]:
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-replicas-") as tmp:
        cfg = SimulateConfig(
            device=args.device,
            precision=args.precision,
            model={
                "d_model": args.d_model,
                "n_layers": args.n_layers,
                "n_heads": 4,
                "seq_len": args.seq_len,
                "n_stages": 2,
                "compression": args.compression,
            },
            steps=args.steps,
            batch_size=args.batch_size,
            microbatches=args.microbatches,
            replicas=replicas,
            eval_batches=2,
            workdir=Path(tmp),
        )
        swarm = Swarm(cfg, Path(tmp))
        r = swarm.run(progress=True)
        if not r["ok"]:
            raise RuntimeError(f"{replicas} replicas: swarm failed: {r['error']}")
        # steady state: skip the first steps (start-up, joining, warm caches)
        skip = min(5, args.steps // 3)
        walls = [e["step_wall_s"] for p in swarm.nodes for e in p.steps() if e["step"] >= skip]
        rounds = [
            e["round_s"]
            for p in swarm.nodes
            for e in p.steps()
            if e["step"] >= skip and e.get("group", 1) > 1
        ]
    step_s = sum(walls) / len(walls)
    round_s = sum(rounds) / len(rounds) if rounds else 0.0
    return {
        "replicas": replicas,
        "stages": 2,
        "nodes": 2 * replicas,
        "steps": args.steps,
        "s_per_step": step_s,
        "averaging_s_per_round": round_s,
        "averaging_share_of_step": round_s / step_s if step_s else 0.0,
        "tokens_per_s": r["tokens_per_s"],
        "wire_bytes_per_step": r["wire_bytes_per_step"],
        "val_loss": r["val_loss"],
        "microbatches_lost": r["microbatches_lost"],
    }


def run(args: argparse.Namespace) -> int:
    out = out_path(args, "replicas")
    say_where("replicas", out)
    rows = []
    for replicas in args.replicas:
        print(f"{replicas} replica(s) per stage ...", file=sys.stderr)
        rows.append(one(args, replicas))
    head = f"{'replicas':>8} {'nodes':>5} {'s/step':>7} {'round s':>8} {'share':>6} {'tok/s':>7}"
    print(head)
    for r in rows:
        print(
            f"{r['replicas']:>8} {r['nodes']:>5} {r['s_per_step']:>7.3f} "
            f"{r['averaging_s_per_round']:>8.3f} {100 * r['averaging_share_of_step']:>5.1f}% "
            f"{r['tokens_per_s']:>7.0f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(args, k) for k in ("d_model", "n_layers", "seq_len", "batch_size")}
    setup.update(microbatches=args.microbatches, compression=args.compression)
    out.write_text(json.dumps({"setup": setup, "runs": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0
