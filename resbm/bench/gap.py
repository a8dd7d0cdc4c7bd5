"""`resbm bench gap`: what the bottleneck costs in loss, paired over seeds, with 95% intervals.

Why a second study beside `bench convergence`: that one trains each boundary once (one seed, one
lr, 8 val batches), and the same config run twice differed there by 0.027 in val loss, a third of
the gap it reported. Here every compressed arm trains on several seeds, and each seed is paired
with the uncompressed baseline of its group (same width, stages and layers) on the same seed: same
data order, same schedule, so what the two runs share cancels out of the per-seed gap, and the
mean gap comes with a t-interval over seeds (gap_report.py). Each arm kind trains at the lr a
small sweep picked for it, on a seed no reported run uses, so no arm loses for running at
another's lr. Val loss is measured on >= 200k held-out tokens (the bundled corpus is prepared once
with a 20% val split; the default 10% is ~111k) and through the arm's wire codec, as a swarm
would compute it.

Arms spend the same wire bytes in different ways (128x bf16, 64x int8, 32x int4: 4 bytes per token
per boundary at d=256): a link pays for bytes, not channels, so the headline and the frontier plot
compare bytes. Every finished run is saved at once and a rerun into the same results file skips
it (runs are keyed by their spec), so the hours-long default survives interruptions and can be
run in pieces (`--groups`). Like every bench it writes ./resbm-bench/ unless --save-results
(the committed benchmarks/results/gap*.json, whose finished runs are then reused) or --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resbm.bench import add_device_args, add_out_args, out_path, say_where
from resbm.bench.gap_plan import (
    CURVE_FRACTION,
    Spec,
    build_plan,
    choose_lrs,
    group_id,
    main_specs,
    model_config,
    run_key,
    select_groups,
    sweep_specs,
)

VAL_FRACTION = 0.2  # of the bundled 1.1M bytes: 223k val tokens, enough for 200k distinct
EVAL_BATCH = 32  # windows per val forward (bigger than training's: a forward is cheap)
TrainFn = Callable[[Spec], dict[str, Any]]


# ---- data and evaluation ---------------------------------------------------------------------
def prepare_data(corpus: str | None, cache: Path | None = None) -> tuple[Path, str]:
    """(directory, fingerprint) of the corpus as a byte-token dataset with a 20% val split,
    prepared once per corpus content (a temp dir keyed by its sha256); byte tokens, so that
    bits per byte = loss / ln 2."""
    from node.shards import MANIFEST, bundled_corpus_path, read_manifest
    from resbm.data_cmd import prepare

    src = Path(corpus) if corpus else bundled_corpus_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = (cache or Path(tempfile.gettempdir())) / f"resbm-gap-data-{digest}-v{VAL_FRACTION}"
    if not (out / MANIFEST).is_file():  # the manifest is written last: present = complete
        prepare([str(src)], "bytes", out, val_fraction=VAL_FRACTION, force=True, progress=False)
    return out, read_manifest(out)["fingerprint"]


def eval_windows(n_val: int, seq_len: int, min_tokens: int) -> tuple[int, int]:
    """(val batches of EVAL_BATCH windows, distinct target positions they cover), for
    `Batches.val_batches`' evenly spread windows over a val split of n_val tokens."""
    import torch

    n = math.ceil(min_tokens / (EVAL_BATCH * seq_len))
    high = n_val - seq_len - 1
    starts = torch.linspace(0, high, n * EVAL_BATCH).long().tolist()  # as val_batches does
    covered, end = 0, -1
    for s in starts:  # targets of a window at s: positions s+1 .. s+seq_len
        lo, hi = max(s + 1, end + 1), s + seq_len
        covered, end = covered + max(hi - lo + 1, 0), max(end, hi)
    return n, covered


def wire_loss(stages, batches, n_batches: int, codec: str, precision: str) -> float:
    """Mean val loss through the stages with every boundary tensor replaced by what the codec
    delivers (`fake_quantize`): what a swarm on that wire computes (node.trainer.evaluate's
    windows and precision; fp32 is the identity)."""
    import torch
    import torch.nn.functional as F

    from node import device as devices
    from node.wire.codec import fake_quantize

    dev = next(stages[0].parameters()).device
    total, pairs = 0.0, batches.val_batches(n_batches)
    with torch.no_grad():
        for x, y in pairs:
            h = x.to(dev)
            with devices.autocast(dev, precision):
                for k, stage in enumerate(stages):  # a reembed stage adds the tokens again
                    h = stage(h) if k == 0 else stage(h, x.to(dev))
                    h = h if k == len(stages) - 1 else fake_quantize(h, codec)
                total += F.cross_entropy(h.flatten(0, 1).float(), y.to(dev).flatten()).item()
    return total / len(pairs)


def train_one(
    spec: Spec, data: Path, threads: int = 0, device: str = "auto", precision: str = "fp32"
) -> dict[str, Any]:
    """One run of the reference trainer; a val curve on 1/8 of the val windows (cheap, and the
    same set for every run, which is what token efficiency compares) and the final val loss on
    all of them (>= spec's val_tokens distinct positions)."""
    from node.config import TrainConfig
    from node.data import Batches
    from node.model.presets import wire_bytes_per_token
    from node.trainer import ReferenceTrainer

    t0 = time.perf_counter()
    cfg = TrainConfig(
        schedule="1f1b",  # the exact rule, whatever RESBM_SCHEDULE says
        device=device,
        precision=precision,
        model=model_config(spec, dict),
        optim={"name": "muon", "lr": spec["lr"]},
        steps=spec["steps"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        data=data,
        eval_every=max(spec["steps"] // spec["curve_points"], 1),
        threads=threads,
        wire_codec=spec["codec"],
        qat=spec["qat"],
    )
    trainer = ReferenceTrainer(cfg, progress=False)
    n_full, covered = eval_windows(trainer.corpus.val.numel(), spec["seq_len"], spec["val_tokens"])
    if covered < spec["val_tokens"]:
        raise ValueError(
            f"val split of {data} ({trainer.corpus.val.numel()} tokens) cannot give "
            f"{spec['val_tokens']} distinct val positions: use a larger --corpus"
        )
    batches = Batches(trainer.corpus, spec["seq_len"], EVAL_BATCH, 0)
    stages = trainer.model.stages()

    def val(n: int) -> float:
        return wire_loss(stages, batches, n, spec["codec"], precision)

    n_curve = max(n_full // CURVE_FRACTION, 1)
    curve = [(0, val(n_curve))]
    while trainer.step < spec["steps"]:
        trainer.train_step()
        if trainer.step % cfg.eval_every == 0 or trainer.step == spec["steps"]:
            curve.append((trainer.step, val(n_curve)))
    result = trainer.result()
    wire, source = result.get("wire_bytes_per_token"), "counted"
    if wire is None and spec["n_stages"] > 1:  # a trainer that does not count them
        wire = wire_bytes_per_token(cfg.model, spec["codec"], spec["batch_size"])
        source = "computed"
    return {
        "val_loss": val(n_full),
        "val_tokens": covered,
        "curve": [[s, s * cfg.tokens_per_step, v] for s, v in curve],
        "train_loss": result["train_loss"],
        "tokens": result["tokens"],
        "parameters": result["params"],
        "wire_bytes_per_token": wire,
        "wire_bytes_source": source,
        "seconds": time.perf_counter() - t0,
    }


# ---- running -------------------------------------------------------------------------------
def load_runs(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()).get("runs", []) if path.is_file() else []


def save_json(path: Path, obj: dict[str, Any]) -> None:
    """Write-then-rename: an interrupted save leaves the last good file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_bench(
    plan: dict[str, Any], out: Path, train_fn: TrainFn, data: str, progress: bool = True
) -> dict[str, Any]:
    """Sweep, pick lrs, train the reported runs (skipping any already in `out`), summarize.
    `train_fn(spec)` returns a run's metrics (train_one, or a fake in tests); `data` is the
    dataset's fingerprint, part of every run's key."""
    from tqdm.auto import tqdm

    from resbm.bench.gap_report import summarize

    done = load_runs(out)
    by_key = {r["key"]: r for r in done}
    sweep = sweep_specs(plan, data)
    n_main = sum(len(a.get("seeds", plan["settings"]["seeds"])) for a in plan["arms"])
    bar = tqdm(total=len(sweep) + n_main, disable=not progress, unit="run", desc="gap")

    def ensure(spec: Spec, what: str) -> None:
        key = run_key(spec)
        if key not in by_key:
            bar.set_postfix_str(f"{what}, seed {spec['seed']}, lr {spec['lr']:g}")
            by_key[key] = {**spec, **train_fn(spec), "key": key}
            done.append(by_key[key])
            save_json(out, {"runs": done})  # every finished run survives an interruption
        bar.update(1)

    for kind, spec in sweep:
        ensure(spec, f"sweep {kind}")
    lrs = choose_lrs(plan, by_key, data)
    for arm, spec in main_specs(plan, lrs, data):
        ensure(spec, f"{group_id(arm, plan['settings'])} {arm['name']}")
    bar.close()
    summary = summarize(plan, lrs, by_key, data)
    save_json(out, {**summary, "runs": done})
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gap",
        help="paired multi-seed gap of each boundary vs uncompressed, with 95%% intervals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one d=256 2-stage group, ~15 min")
    size.add_argument("--full", action="store_true", help="every group and arm: ~13 h")
    p.add_argument(
        "--groups",
        nargs="+",
        help="only these groups (see --dry-run), with the sweep runs they need; run the rest "
        "later into the same --out, and a run without --groups then reports them all",
    )
    p.add_argument("--dry-run", action="store_true", help="print runs left and minutes per group")
    p.add_argument("--corpus", help="a text file (byte tokens); default tiny shakespeare")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    add_out_args(p, "gap[-quick|-full]")
    p.add_argument("--no-plot", action="store_true", help="write no PNGs beside the results JSON")
    add_device_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from resbm.bench import gap_report

    mode = "quick" if args.quick else "full" if args.full else "default"
    plan = select_groups(build_plan(mode), args.groups)
    out = out_path(args, {"quick": "gap-quick", "full": "gap-full", "default": "gap"}[mode])
    say_where("gap", out)
    data, fingerprint = prepare_data(args.corpus)
    todo = gap_report.remaining(plan, load_runs(out), fingerprint)
    minutes = sum(m for _, _, m in todo.values())
    print(
        f"gap ({plan['mode']}): {sum(n for n, _, _ in todo.values())} runs left, about "
        f"{minutes:.0f} min on 2 CPU cores (estimate); finished runs in {out} are skipped",
        file=sys.stderr,
    )
    if args.dry_run:
        for what, (n, total, m) in todo.items():
            print(f"{what:<24} {n:>3} of {total:>3} runs left  ~{m:5.0f} min")
        return 0

    def train(spec: Spec) -> dict[str, Any]:
        return train_one(spec, data, args.threads, args.device, args.precision)

    summary = run_bench(plan, out, train, fingerprint)
    print(gap_report.table(summary))
    if not args.no_plot:
        pngs = gap_report.plot(summary, out)
        print(f"wrote {out} and {', '.join(map(str, pngs))}")
    return 0
