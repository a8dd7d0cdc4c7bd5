"""Benchmarks: each prints a table and writes its JSON (and a plot where one helps).

Every bench measures afresh and, by default, writes to a run folder in the current directory,
./resbm-bench/NAME.json, never over the committed results. `--out PATH` writes elsewhere;
`--save-results` writes the committed file, benchmarks/results/NAME.json, which is how those
files are regenerated (benchmarks/README.md). `bench gap` takes the same options but resumes:
its runs take hours, so the finished ones already in its results file are reused (it says how
many runs are left when it starts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results")  # the committed results (benchmarks/README.md's tables)
RUNS = Path("resbm-bench")  # where a bench writes unless told otherwise


def add_device_args(p) -> None:
    """`--device` and `--precision` for a benchmark's runs (the training commands' meaning)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N], mps")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="default fp32")


# the model-size and run options the benches share: (setting, what it is), in this order
MODEL_ARGS = [
    ("stages", "pipeline stages"),
    ("steps", "optimizer steps a run"),
    ("d_model", "residual width d"),
    ("n_layers", "transformer blocks"),
    ("n_heads", "attention heads"),
    ("seq_len", "context length"),
    ("batch_size", "sequences per microbatch"),
    ("microbatches", "microbatches per step"),
    ("compression", "boundary compression d/b; 1 = none"),
    ("wire_codec", "boundary tensor codec"),
]


def add_model_args(p: argparse.ArgumentParser, **defaults: int | str | list[int]) -> None:
    """The shared options named in `defaults` (MODEL_ARGS' names), each with this bench's
    default, in MODEL_ARGS' order: a bench that records its args in order may call it twice
    around its own options. A list `compression` takes several values (one run each)."""
    if unknown := set(defaults) - {name for name, _ in MODEL_ARGS}:
        raise TypeError(f"add_model_args: unknown options {sorted(unknown)}")
    for name, what in MODEL_ARGS:
        if name not in defaults:
            continue
        default, kw = defaults[name], {}
        if name == "wire_codec":
            from node.wire.kinds import WireCodec  # no torch: only the codecs' names

            what = f"{what}: {', '.join(WireCodec)}"
        else:
            kw["type"] = int
        if isinstance(default, list):
            kw["nargs"] = "+"
            what = "boundary compressions d/b to compare, one run each; 1 = none"
            shown = " ".join(map(str, default))
        else:
            shown = default
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, default=default, help=f"{what} (default {shown})", **kw)


def add_out_args(p: argparse.ArgumentParser, name: str) -> None:
    """`--out PATH` or `--save-results`; `name`: the results file's name without .json (what
    it is called in benchmarks/results/)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--out",
        metavar="PATH",
        help=f"results JSON, plots beside it (default {RUNS}/{name}.json)",
    )
    g.add_argument(
        "--save-results",
        action="store_true",
        help=f"write the committed {RESULTS}/{name}.json (and plot) instead",
    )


def out_path(args: argparse.Namespace, name: str) -> Path:
    """Where this run's results go: --out, the committed file with --save-results, else the
    run folder."""
    if getattr(args, "out", None):
        return Path(args.out)
    return (RESULTS if getattr(args, "save_results", False) else RUNS) / f"{name}.json"


def say_where(bench: str, out: Path) -> None:
    """Say at the start where the results will go (the committed ones are left alone)."""
    note = "" if out.parent == RESULTS else f" (--save-results: {RESULTS}/{out.name})"
    print(f"bench {bench}: results to {out}{note}", file=sys.stderr, flush=True)


def setting_of(args: argparse.Namespace) -> dict:
    """The args a results file records as its setting: where it was written is no setting."""
    return {k: v for k, v in vars(args).items() if k not in ("handler", "out", "save_results")}
