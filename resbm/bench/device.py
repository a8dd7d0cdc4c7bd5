"""`resbm bench device`: how fast one stage trains on this machine's device, fp32 against bf16.

For each model preset and precision, stage 0 of a 2-stage cut runs forward + backward on
microbatches of the preset's context length, through the same `StageRuntime` a node uses (host
edge copies included), after a warm-up; the table gives tokens/s, MFU against the device's dense
peak (GPUs whose peak is known), and peak memory. Then a 2-stage `simulate` (real node processes
on this device) gives the swarm's tokens/s beside it. Results: ./resbm-bench/device-<kind>.json
and a plot (--out to choose; --save-results: the committed benchmarks/results/ ones).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resbm.bench import add_out_args, out_path, say_where

PRESETS = ["tiny", "small", "base"]
PRECISIONS = ["fp32", "bf16"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device",
        help="one stage's forward+backward tokens/s (and MFU) per preset, fp32 vs bf16",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--presets", nargs="+", default=PRESETS, help="model presets (tiny small base)")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=PRECISIONS,
        choices=PRECISIONS,
        help="precisions to time each preset in (default fp32 bf16)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="sequences; 0 = by device and preset")
    p.add_argument("--iters", type=int, default=0, help="timed microbatches; 0 = by device")
    p.add_argument("--warmup", type=int, default=2, help="untimed microbatches first (default 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    p.add_argument("--simulate-steps", type=int, default=20, help="2-stage swarm steps; 0 = skip")
    add_out_args(p, "device-KIND")
    p.set_defaults(handler=run)


def kind_of(device_name: str) -> str:
    """`cpu`, or the GPU's name as a file-name slug (`nvidia-h200`)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "cpu"


def stage_speed(
    preset: str, precision: str, dev, *, batch_size: int, iters: int, warmup: int, compile: bool
) -> dict[str, Any]:
    """Tokens/s of stage 0 (embedding, blocks, encoder) forward + backward, one microbatch at
    a time, as a 2-stage node runs it; the optimizer step is not timed (once per step)."""
    import torch

    from node import device as devices
    from node.data import Batches, Corpus
    from node.model.config import OptimSettings
    from node.model.presets import peak_flops, preset_config, stage_flops_per_token
    from node.model.resbm import ResBM
    from node.runtime import StageRuntime

    cfg = preset_config(preset, n_stages=2)
    corpus = Corpus.load(None)
    batches = Batches(corpus, cfg.seq_len, batch_size, seed=0)
    torch.manual_seed(0)
    stage = ResBM(cfg).stage(0)
    rt = StageRuntime(stage, OptimSettings(), batches, 1, dev, precision, compile)
    devices.reset_peak_memory(dev)
    grad = torch.ones(batch_size, cfg.seq_len, cfg.boundary_dim) * 1e-3

    def one(i: int) -> None:
        mb = batches.microbatch(0, i)
        rt.forward(mb)
        rt.backward(mb.id, grad)

    for i in range(warmup):
        one(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for i in range(iters):
        one(warmup + i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    tok_s = iters * batch_size * cfg.seq_len / seconds
    flops = stage_flops_per_token(cfg)[0]
    peak = peak_flops(devices.name(dev), precision)
    return {
        "preset": preset,
        "precision": precision,
        "parameters_stage": sum(p.numel() for p in stage.parameters()),
        "batch_size": batch_size,
        "seq_len": cfg.seq_len,
        "iters": iters,
        "s_per_microbatch": seconds / iters,
        "tokens_per_s": tok_s,
        "tflops": flops * tok_s / 1e12,
        "mfu": flops * tok_s / peak if peak else None,
        # per cell on a GPU; a CPU's figure is the process's RSS high-water mark, not this cell's
        "peak_memory_bytes": devices.peak_memory_bytes(dev) if dev.type == "cuda" else None,
    }


def swarm_speed(dev_spec: str, steps: int) -> dict[str, Any]:
    """A 2-stage `simulate` (tiny preset, fp32 and bf16 wire as default) on the same device."""
    from resbm.simulate import SimulateConfig, Swarm

    with tempfile.TemporaryDirectory(prefix="resbm-bench-device-") as tmp:
        cfg = SimulateConfig(
            preset="tiny", steps=steps, device=dev_spec, microbatches=4, workdir=Path(tmp)
        )
        r = Swarm(cfg, Path(tmp)).run(progress=True)
    if not r["ok"]:
        raise RuntimeError(f"2-stage simulate failed: {r['error']}")
    return {k: r[k] for k in ("steps", "tokens_per_s", "device", "precision", "mfu", "val_loss")}


def _defaults(dev, preset: str) -> tuple[int, int]:
    """(batch size, timed iterations) that keep each cell to seconds on this device."""
    if dev.type == "cuda":
        return {"tiny": 64, "small": 32, "base": 16}.get(preset, 8), 20
    return {"tiny": 16, "small": 4, "base": 1}.get(preset, 1), 3


def run(args: argparse.Namespace) -> int:
    from node import device as devices

    dev = devices.resolve(args.device)
    devices.configure(dev)
    name = devices.name(dev)
    out = out_path(args, f"device-{kind_of(name)}")
    say_where("device", out)
    rows = []
    for preset in args.presets:
        batch, iters = _defaults(dev, preset)
        for precision in args.precisions:
            print(f"{preset} {precision} on {name} ...", file=sys.stderr)
            rows.append(
                stage_speed(
                    preset,
                    precision,
                    dev,
                    batch_size=args.batch_size or batch,
                    iters=args.iters or iters,
                    warmup=args.warmup,
                    compile=args.compile,
                )
            )
    swarm = swarm_speed(str(dev), args.simulate_steps) if args.simulate_steps else None
    result = {"device": name, "kind": kind_of(name), "compile": args.compile, "stage": rows}
    result["bf16_vs_fp32"] = {
        p: by["bf16"] / by["fp32"]
        for p in args.presets
        if {"fp32", "bf16"}
        <= set(by := {r["precision"]: r["tokens_per_s"] for r in rows if r["preset"] == p})
    }
    result["simulate_2_stages"] = swarm
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    head = (
        f"{'preset':<7} {'prec':<5} {'batch':>5} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak mem':>10}"
    )
    print(f"one stage (stage 0 of 2) forward+backward on {r['device']}\n{head}\n{'-' * len(head)}")
    for s in r["stage"]:
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        print(
            f"{s['preset']:<7} {s['precision']:<5} {s['batch_size']:>5} "
            f"{s['tokens_per_s']:>10,.0f} {s['tflops']:>8.3f} {mfu:>6} "
            + (f"{s['peak_memory_bytes'] / 2**20:>6,.0f} MiB" if s["peak_memory_bytes"] else "n/a")
        )
    for preset, ratio in r["bf16_vs_fp32"].items():
        print(f"{preset}: bf16 runs at {ratio:.2f}x fp32's tokens/s")
    if r["simulate_2_stages"]:
        sw = r["simulate_2_stages"]
        print(f"2-stage simulate (tiny, {sw['steps']} steps): {sw['tokens_per_s']:,.0f} tok/s")


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(s["preset"] for s in r["stage"]))
    precisions = list(dict.fromkeys(s["precision"] for s in r["stage"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(precisions)
    for j, prec in enumerate(precisions):
        vals = [
            next(
                (
                    s["tokens_per_s"]
                    for s in r["stage"]
                    if s["preset"] == p and s["precision"] == prec
                ),
                0,
            )
            for p in presets
        ]
        ax.bar([i + j * width for i in range(len(presets))], vals, width, label=prec)
    ax.set_xticks([i + width * (len(precisions) - 1) / 2 for i in range(len(presets))], presets)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (one stage, fwd+bwd)")
    ax.set_title(f"resbm bench device: {r['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
