"""`resbm bench convergence`: what the bottleneck costs in loss, at equal data and token budget.

Every run uses the same seed, data order and token budget; only the boundary changes. Each run's
result is appended to the results file the moment it finishes. Every run is trained afresh
unless `--resume` is given: then runs already in the results file are skipped, so the hour-long
default matrix survives an interrupted session.

Results go to ./resbm-bench/convergence.json (convergence-quick.json with --quick), or to
--out; `--save-results` writes the committed benchmarks/results/ files. `--replay` trains
nothing and prints the table of a results file (default: the committed one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from resbm.bench import RESULTS, add_device_args, add_out_args, out_path, say_where

# (compression, optimizer, identity_path, encoder); uncompressed first: gaps are measured to it
MATRIX = [
    (1, "muon", True, "mlp"),
    (128, "muon", True, "mlp"),
    (32, "muon", True, "mlp"),
    (128, "muon", False, "mlp"),
    (128, "muon", True, "fused"),
    (1, "adamw", True, "mlp"),
    (128, "adamw", True, "mlp"),
    (32, "adamw", True, "mlp"),
]
D512_MATRIX = [(1, "muon", True, "mlp"), (128, "muon", True, "mlp")]

PRESETS = {
    # the probe's setting: d=256, 4 layers, 16x128 tokens a step
    "full": {
        "d_model": 256,
        "n_layers": 4,
        "n_heads": 4,
        "seq_len": 128,
        "batch_size": 16,
        "steps": 300,
        "stages": [2, 4],
    },
    "quick": {
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "seq_len": 64,
        "batch_size": 8,
        "steps": 120,
        "stages": [2, 4],
    },
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convergence",
        help="val loss of uncompressed vs ResBM boundaries (Muon and AdamW)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small matrix, a few minutes on 2 cores")
    p.add_argument("--d-model", type=int, help="512: the opt-in uncompressed-vs-128x Muon pair")
    p.add_argument("--steps", type=int, help="override the preset's steps")
    p.add_argument("--stages", type=int, nargs="+", help="override the preset's stage counts")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate of every run (default 3e-3)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and the data order, the same for every run (default 0)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    add_out_args(p, "convergence[-quick]")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in the results file and train only the missing ones",
    )
    p.add_argument(
        "--replay",
        action="store_true",
        help="train nothing: print the table of the results file (--out, "
        "or the committed benchmarks/results/ one)",
    )
    p.add_argument("--no-plot", action="store_true", help="write no PNG beside the results JSON")
    add_device_args(p)
    p.set_defaults(handler=run)


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    matrix = MATRIX
    if args.d_model:
        preset["d_model"] = args.d_model
        if args.d_model >= 512:
            matrix, preset["stages"] = D512_MATRIX, [2]
    if args.steps:
        preset["steps"] = args.steps
    if args.stages:
        preset["stages"] = args.stages
    runs = [
        {
            "compression": c,
            "optimizer": o,
            "identity_path": i,
            "encoder": e,
            "stages": s,
            "d_model": preset["d_model"],
            "n_layers": preset["n_layers"],
            "n_heads": preset["n_heads"],
            "seq_len": preset["seq_len"],
            "batch_size": preset["batch_size"],
            "steps": preset["steps"],
            "lr": args.lr,
            "seed": args.seed,
        }
        for s in preset["stages"]
        for (c, o, i, e) in matrix
    ]
    return preset, runs


def run_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def train_one(
    spec: dict[str, Any], threads: int, device: str = "auto", precision: str = "fp32"
) -> dict[str, Any]:
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    cfg = TrainConfig(
        schedule="1f1b",  # the exact rule, whatever RESBM_SCHEDULE says
        device=device,
        precision=precision,
        model={
            "d_model": spec["d_model"],
            "n_layers": spec["n_layers"],
            "n_heads": spec["n_heads"],
            "seq_len": spec["seq_len"],
            "n_stages": spec["stages"],
            "compression": spec["compression"],
            "identity_path": spec["identity_path"],
            "encoder": spec["encoder"],
        },
        optim={"name": spec["optimizer"], "lr": spec["lr"]},
        steps=spec["steps"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        eval_every=max(spec["steps"] // 10, 1),
        threads=threads,
    )
    result = ReferenceTrainer(cfg, progress=True).run()
    return {
        **spec,
        **{
            k: result[k]
            for k in (
                "tokens",
                "train_loss",
                "val_loss",
                "val_history",
                "loss_history",
                "tokens_per_s",
                "params",
                "boundary_dim",
                "wire_bytes_ratio",
            )
        },
        "key": run_key(spec),
    }


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("runs", [])


def save_results(path: Path, runs: list[dict[str, Any]]) -> None:
    from node.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps({"runs": runs}, indent=1).encode())


def label(r: dict[str, Any]) -> str:
    if r["compression"] == 1:
        return "uncompressed"
    name = f"ResBM {r['compression']}x"
    if not r["identity_path"]:
        name += " no-identity"
    if r["encoder"] != "mlp":
        name += f" {r['encoder']}"
    return name


def table(runs: list[dict[str, Any]]) -> str:
    base = {
        (r["d_model"], r["stages"], r["optimizer"], r["steps"]): r["val_loss"]
        for r in runs
        if r["compression"] == 1
    }
    head = (
        f"{'d':>4} {'stages':>6} {'optim':>6}  {'boundary':<26} {'b':>3} {'wire x':>7} "
        f"{'val loss':>9} {'gap %':>7} {'tok/s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(
        runs,
        key=lambda r: (
            r["d_model"],
            r["stages"],
            r["optimizer"] != "muon",
            r["compression"] != 1,
            -r["compression"],
            label(r),
        ),
    ):
        ref = base.get((r["d_model"], r["stages"], r["optimizer"], r["steps"]))
        gap = f"{100 * (r['val_loss'] / ref - 1):+.1f}" if ref else "n/a"
        lines.append(
            f"{r['d_model']:>4} {r['stages']:>6} {r['optimizer']:>6}  {label(r):<26} "
            f"{r['boundary_dim']:>3} {r['wire_bytes_ratio']:>7.0f} {r['val_loss']:>9.4f} "
            f"{gap:>7} {r['tokens_per_s']:>7.0f}"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d_model"], r["stages"], r["optimizer"]) for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (d, s, o) in zip(axes[0], panels, strict=True):
        for r in runs:
            if (r["d_model"], r["stages"], r["optimizer"]) != (d, s, o):
                continue
            steps, vals = zip(*r["val_history"], strict=True)
            ax.plot(steps, vals, marker=".", label=f"{label(r)} ({r['val_loss']:.3f})")
        ax.set(title=f"d={d}, {s} stages, {o}", xlabel="step", ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_name(args: argparse.Namespace) -> str:
    return "convergence-quick" if args.quick else "convergence"


def replay(args: argparse.Namespace, specs: list[dict[str, Any]]) -> int:
    """The table of runs already measured (nothing trained, nothing written)."""
    path = Path(args.out) if args.out else RESULTS / f"{results_name(args)}.json"
    if not path.is_file():
        print(f"bench convergence: --replay: no results file {path}", file=sys.stderr)
        return 2
    wanted = {run_key(s) for s in specs}
    mine = [r for r in load_results(path) if r["key"] in wanted]
    print(
        f"convergence: replaying {len(mine)} of {len(specs)} runs from {path} (measured "
        "earlier, not now; drop --replay to measure)",
        file=sys.stderr,
    )
    if not mine:
        return 1
    print(table(mine))
    return 0


def run(args: argparse.Namespace) -> int:
    preset, specs = plan(args)
    if args.replay:
        return replay(args, specs)
    out = out_path(args, results_name(args))
    say_where("convergence", out)
    wanted = {run_key(s) for s in specs}
    # afresh: this plan's runs are measured again; runs of other settings in the file stay
    done = [r for r in load_results(out) if args.resume or r["key"] not in wanted]
    finished = {r["key"] for r in done}
    todo = [s for s in specs if run_key(s) not in finished]
    print(
        f"convergence: {len(specs)} runs ({len(specs) - len(todo)} already in {out}); "
        f"preset {preset}",
        file=sys.stderr,
    )
    for i, spec in enumerate(todo, 1):
        print(
            f"[{i}/{len(todo)}] {label(spec)}, {spec['optimizer']}, {spec['stages']} stages",
            file=sys.stderr,
        )
        done.append(train_one(spec, args.threads, args.device, args.precision))
        save_results(out, done)  # every finished run survives an interruption (--resume)
    mine = [r for r in done if r["key"] in wanted]
    print(table(mine))
    if not args.no_plot and mine:
        png = out.with_suffix(".png")
        plot(mine, png)
        print(f"wrote {out} and {png}")
    return 0
