"""`resbm presets`: what each model size costs before anything is built or downloaded.

One row per preset (`--model NAME` on train, node, coordinator and simulate): its shape, its
parameters in all and per pipeline stage, the boundary width b and the bytes per token that cross
each boundary each way, the device memory of the hungriest stage and the training FLOPs per
token. Everything is arithmetic on the config (node/model/presets.py); nothing is allocated, so
`large` costs no more than `tiny`. Memory is an estimate: fp32 master weights, gradients and
optimizer state, 1F1B's in-flight activations (n_stages - stage microbatches at stage k), and
under bf16 each in-flight microbatch's bf16 weight copies; the CUDA context and allocator slack
(~1 GB) come on top.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

CODECS = ["fp32", "bf16", "fp16", "int8", "int8-channel", "int4-channel"]  # kinds.py's WireCodec


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "presets",
        help="model size presets: parameters, wire bytes, memory and FLOPs per token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stages", type=_positive, default=2, help="pipeline stages (default 2)")
    p.add_argument("--compression", type=_positive, default=32, help="d/b (default 32)")
    p.add_argument(
        "--wire-codec", choices=CODECS, default="int4-channel", help="default int4-channel"
    )
    p.add_argument("--vocab-size", type=_positive, default=256, help="default 256 (bytes)")
    p.add_argument(
        "--batch-size", type=_positive, default=16, help="sequences per microbatch (default 16)"
    )
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default="bf16", help="default bf16 (a GPU run)"
    )
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon", help="default muon")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(handler=main)


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dict per preset with every number; a preset that cannot take these settings (fewer
    layers than stages, a compression that does not divide d) gets a `note` and no numbers."""
    from node.model.presets import (
        PRESETS,
        memory_estimate,
        preset_config,
        stage_flops_per_token,
        stage_parameter_counts,
        wire_bytes_per_token,
    )

    out = []
    for name, shape in PRESETS.items():
        row: dict[str, Any] = {"preset": name, **{k: shape[k] for k in sorted(shape)}}
        try:
            cfg = preset_config(
                name,
                n_stages=args.stages,
                compression=args.compression,
                vocab_size=args.vocab_size,
            )
        except ValueError as err:
            errors = getattr(err, "errors", None)
            row["note"] = errors()[0]["msg"].removeprefix("Value error, ") if errors else str(err)
            out.append(row)
            continue
        per_stage = stage_parameter_counts(cfg)
        flops = stage_flops_per_token(cfg)
        memory = [
            memory_estimate(
                cfg,
                k,
                batch_size=args.batch_size,
                precision=args.precision,
                optimizer=args.optimizer,
            )
            for k in range(cfg.n_stages)
        ]
        worst = max(range(cfg.n_stages), key=lambda k: memory[k]["total"])
        wire = wire_bytes_per_token(cfg, args.wire_codec, args.batch_size)
        row.update(
            vocab_size=cfg.vocab_size,
            n_stages=cfg.n_stages,
            compression=cfg.compression,
            boundary_dim=cfg.boundary_dim,
            parameters=sum(per_stage),
            stage_parameters=per_stage,
            wire_bytes_per_token=wire,
            wire_bytes_per_microbatch=wire * args.batch_size * cfg.seq_len,
            flops_per_token=sum(flops),
            stage_flops_per_token=flops,
            memory=memory,
            memory_max_stage=worst,
            memory_max_bytes=memory[worst]["total"],
            note=None,
        )
        out.append(row)
    return out


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def table(result: list[dict[str, Any]]) -> str:
    head = ["preset", "d", "layers", "heads", "seq", "params", "params/stage", "b"]
    head += ["wire B/tok", "memory/stage", "GFLOP/tok"]
    lines, notes = [head], []
    for r in result:
        shape = [r["preset"], r["d_model"], r["n_layers"], r["n_heads"], r["seq_len"]]
        if r.get("note"):
            notes.append(f"{r['preset']}: {r['note']}")
            lines.append([*shape, *["-"] * (len(head) - len(shape))])
            continue
        gib = r["memory_max_bytes"] / 2**30
        lines.append(
            [
                *shape,
                _count(r["parameters"]),
                " ".join(_count(n) for n in r["stage_parameters"]),
                r["boundary_dim"],
                f"{r['wire_bytes_per_token']:.4g}",
                f"{gib:.1f} GiB (stage {r['memory_max_stage']})",
                f"{r['flops_per_token'] / 1e9:.3g}",
            ]
        )
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    text = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    return "\n".join([*text, *(f"note: {n}" for n in notes)])


def main(args: argparse.Namespace) -> int:
    result = rows(args)
    settings = {
        k: getattr(args, k)
        for k in (
            "stages",
            "compression",
            "wire_codec",
            "vocab_size",
            "batch_size",
            "precision",
            "optimizer",
        )
    }
    if args.json:
        print(json.dumps({"settings": settings, "presets": result}))
        return 0
    print(
        f"{args.stages} stages, compression {args.compression}, wire {args.wire_codec}, "
        f"vocab {args.vocab_size}, batch {args.batch_size} x seq, {args.precision}, "
        f"{args.optimizer}; memory: the largest stage with 1F1B's in-flight microbatches, "
        "without the CUDA context"
    )
    print(table(result))
    return 0
