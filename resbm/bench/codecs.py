"""`resbm bench codecs`: what each wire codec costs in loss and saves in bytes.

The same 2-stage swarm (real node processes over loopback) is trained once per codec, same seed,
data and steps; the table gives val loss, its gap to the exact fp32 wire, and wire bytes per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from resbm.bench import add_device_args, add_model_args, add_out_args, out_path, say_where

CODECS = ["fp32", "bf16", "fp16", "int8", "int8-channel", "int4-channel"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "codecs",
        help="val loss and wire bytes per wire codec (2-stage swarm)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(
        p, steps=200, d_model=256, n_layers=4, seq_len=128, batch_size=16, compression=128
    )
    p.add_argument(
        "--codecs",
        nargs="+",
        default=CODECS,
        choices=CODECS,
        help="wire codecs to compare, one swarm each (default: all of them)",
    )
    add_out_args(p, "codecs")
    add_device_args(p)
    p.set_defaults(handler=run)


def one(args, codec: str) -> dict[str, Any]:
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-codecs-") as tmp:
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
            wire_codec=codec,
            workdir=Path(tmp),
        )
        r = Swarm(cfg, Path(tmp)).run(progress=True)
    if not r["ok"]:
        raise RuntimeError(f"{codec}: swarm failed: {r['error']}")
    return {
        "codec": codec,
        "compression": args.compression,
        "d_model": args.d_model,
        "boundary_dim": r["boundary_dim"],
        "steps": r["steps"],
        "val_loss": r["val_loss"],
        "train_loss": r["train_loss"],
        "bytes_per_step": r["wire_bytes_per_step"],
        "wire_compression_vs_bf16": r["wire_compression_vs_bf16"],
        "tokens_per_s": r["tokens_per_s"],
        "loss_history": r["loss_history"],
    }


def run(args: argparse.Namespace) -> int:
    out = out_path(args, "codecs")
    say_where("codecs", out)
    rows = []
    for codec in args.codecs:
        print(f"codec {codec} ...", file=sys.stderr)
        rows.append(one(args, codec))
    ref = next((r["val_loss"] for r in rows if r["codec"] == "fp32"), None)
    head = f"{'codec':<13} {'val loss':>9} {'vs fp32 %':>9} {'bytes/step':>11} {'x vs bf16 d':>11}"
    print(f"2 stages, d={args.d_model}, b={rows[0]['boundary_dim']}, {args.steps} steps\n{head}")
    print("-" * len(head))
    for r in rows:
        gap = f"{100 * (r['val_loss'] / ref - 1):+.2f}" if ref else "n/a"
        print(
            f"{r['codec']:<13} {r['val_loss']:>9.4f} {gap:>9} {r['bytes_per_step']:>11,.0f} "
            f"{r['wire_compression_vs_bf16']:>11.1f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows}, indent=1))
    print(f"wrote {out}")
    return 0
