"""`resbm bench gap`'s plan: which arms (boundary kinds) train in which groups (width, stages,
layers), on which seeds and at which lr, and the spec that keys each run. Pure and torch-free:
the runner (gap.py) trains the specs, the report (gap_report.py) reads them back by key."""

from __future__ import annotations

import json
import math
from typing import Any

LRS = [1.5e-3, 3e-3, 6e-3]
CURVE_FRACTION = 8  # a curve point is evaluated on 1/8 of the final val set's windows
# the frontier: equal bytes at d=256 (b = 2, 4, 8 channels at 2, 1, 0.5 bytes each)
FRONTIER = [(128, "bf16", False), (64, "int8", True), (32, "int4-channel", True)]
ARM_KEYS = ("d_model", "n_stages", "n_layers", "compression", "codec", "qat", "boundary_norm")
ARM_KEYS += ("encoder", "reembed")
# an arm kind: (compression, codec, qat, boundary_norm[, encoder[, reembed]])
BASELINE = (1, "fp32", False, False)
FRONTIER_ARMS = [(c, codec, qat, norm) for c, codec, qat in FRONTIER for norm in (False, True)]

Spec = dict[str, Any]


# ---- the plan ------------------------------------------------------------------------------
def arm_name(
    compression: int,
    codec: str,
    qat: bool,
    norm: bool,
    encoder: str = "mlp",
    reembed: bool = False,
) -> str:
    """`reembed` is beyond the paper (every stage needs the data): its arms say so by name."""
    if compression == 1:
        return "baseline"
    name = f"{compression}x {codec}" + (" qat" if qat else "") + (" norm" if norm else "")
    name = name if encoder == "mlp" else f"{name} {encoder}"
    return f"{name} reembed" if reembed else name


def _full_kind(kind: tuple) -> tuple:
    return (*kind, "mlp", False)[:6] if len(kind) == 4 else (*kind, False)[:6]


def group_arms(d: int, stages: int, layers: int, kinds: list, **extra: Any) -> list[dict]:
    """A group: its fp32 uncompressed baseline first, then one arm per (compression, codec,
    qat, boundary_norm). `extra` (steps, seeds) overrides the mode's settings for the group."""
    return [
        {
            "name": arm_name(*_full_kind(kind)),
            **dict(zip(ARM_KEYS, (d, stages, layers, *_full_kind(kind)), strict=True)),
            **extra,
        }
        for kind in [BASELINE, *kinds]
    ]


# the default's arms: the frontier at equal bytes; the normalised boundary where z has 8
# channels (at b=2 a per-token unit RMS leaves one degree of freedom of two: gap-quick.json);
# IOTA's E/D form and (beyond the paper) per-stage re-embedding, both at 128x bf16
DEFAULT_KINDS = [(128, "bf16", False, False), (64, "int8", True, False)]
DEFAULT_KINDS += [(32, "int4-channel", True, False), (32, "int4-channel", True, True)]
DEFAULT_KINDS += [(128, "bf16", False, False, "iota"), (128, "bf16", False, False, "mlp", True)]
FOUR_STAGE_KINDS = [(128, "bf16", False, False), (64, "int8", True, False)]
FOUR_STAGE_KINDS += [(32, "int4-channel", True, False), (32, "int4-channel", True, True)]
# the width curve (128x bf16, the paper's boundary) and the default boundary at d=512 and 1024
WIDTH_KINDS = [(128, "bf16", False, False), (32, "int4-channel", True, True)]


def build_plan(mode: str) -> dict[str, Any]:
    """`quick`: one 2-stage d=256 group, 2 seeds, a fixed lr (no sweep), short runs: ~15 min.
    `default` (~2 h on 2 cores): d=256 at 2 stages (4 layers) with the 6 DEFAULT_KINDS and at
    4 stages x 2 blocks (8 layers) with the 4 FOUR_STAGE_KINDS, 3 seeds, 8 sequences a step;
    the lr swept per arm kind over 100-step runs on the 2-stage group; the width curve and a
    two-point frontier (128x bf16 and the default 32x int4 qat norm) at d=512 (3 seeds) and
    d=1024 (100 steps, one seed). `full` (~14 h: run it in pieces with --groups): also 4
    stages x 1 block, every frontier arm with and without boundary_norm, 16 sequences a step,
    full-length sweeps, and d=512 (3 seeds) and d=1024 (short, one seed) on the width curve."""
    if mode == "default":
        settings = dict(seq_len=128, batch_size=8, steps=300, seeds=[1, 2, 3], lr=3e-3)
        settings["sweep"] = {"seed": 0, "lrs": LRS, "group": [256, 2, 4], "steps": 100}
        settings["lr_note"] = (
            "lr per arm kind from a sweep of 100-step runs on the d=256 2-stage group, seed 0"
        )
        arms = group_arms(256, 2, 4, DEFAULT_KINDS)
        arms += group_arms(256, 4, 8, FOUR_STAGE_KINDS)
        arms += group_arms(512, 2, 4, WIDTH_KINDS)
        arms += group_arms(1024, 2, 4, WIDTH_KINDS, steps=100, seeds=[1])
    elif mode == "quick":
        settings = dict(seq_len=64, batch_size=8, steps=150, seeds=[1, 2], lr=3e-3, sweep=None)
        settings["lr_note"] = "fixed lr 3e-3 for every arm (quick mode runs no sweep)"
        kinds = [(128, "bf16", False, False), (128, "bf16", False, True), (64, "int8", True, False)]
        kinds += [(32, "int4-channel", True, False)]
        arms = group_arms(256, 2, 4, kinds)
    elif mode == "full":
        settings = dict(seq_len=128, batch_size=16, steps=300, seeds=[1, 2, 3], lr=3e-3)
        settings["sweep"] = {"seed": 0, "lrs": LRS, "group": [256, 2, 4]}
        settings["lr_note"] = "lr per arm kind from the sweep on the d=256 2-stage group, seed 0"
        forms = DEFAULT_KINDS[-2:]  # iota and reembed at 2 stages
        arms = group_arms(256, 2, 4, FRONTIER_ARMS + forms)
        arms += [a for g in [(4, 8), (4, 4)] for a in group_arms(256, *g, FRONTIER_ARMS)]
        arms += group_arms(512, 2, 4, FRONTIER_ARMS[:1])  # the width curve at 128x bf16
        arms += group_arms(1024, 2, 4, FRONTIER_ARMS[:1], steps=100, seeds=[1])
    else:
        raise ValueError(f"unknown mode {mode!r}: quick, default or full")
    settings.update(head_dim=64, val_tokens=200_000, curve_points=6, headline_d=256)
    sweep = settings["sweep"]
    in_sweep = [a for a in arms if sweep and group_key(a) == tuple(sweep["group"])]
    return {"mode": mode, "settings": settings, "arms": arms, "sweep_arms": in_sweep}


def group_key(arm: dict[str, Any]) -> tuple[int, int, int]:
    return arm["d_model"], arm["n_stages"], arm["n_layers"]


def group_id(arm: dict[str, Any], settings: dict[str, Any]) -> str:
    gid = f"d{arm['d_model']}-{arm['n_stages']}s-{arm['n_layers']}L"
    steps = arm.get("steps", settings["steps"])
    return gid if steps == settings["steps"] else f"{gid}-{steps}steps"


def arm_kind(arm: dict[str, Any]) -> str:
    """What the lr sweep is shared by: the boundary, not the group it sits in."""
    return arm_name(*(arm[k] for k in ARM_KEYS[3:]))


def run_spec(
    arm: dict[str, Any], settings: dict[str, Any], lr: float, seed: int, data: str
) -> Spec:
    """Everything that decides a run's numbers; its JSON is the key a rerun skips it by."""
    return {
        **{k: arm[k] for k in ARM_KEYS},
        "n_heads": max(arm["d_model"] // settings["head_dim"], 1),
        "seq_len": settings["seq_len"],
        "batch_size": settings["batch_size"],
        "steps": arm.get("steps", settings["steps"]),
        "lr": lr,
        "seed": seed,
        "data": data,
        "val_tokens": settings["val_tokens"],
        "curve_points": settings["curve_points"],
    }


def run_key(spec: Spec) -> str:
    return json.dumps(spec, sort_keys=True)


def sweep_specs(plan: dict[str, Any], data: str) -> list[tuple[str, Spec]]:
    """(arm kind, spec) of every sweep run: each kind in the sweep group at each lr."""
    s = plan["settings"]
    if not s["sweep"]:
        return []
    steps = {"steps": s["sweep"]["steps"]} if "steps" in s["sweep"] else {}
    return [
        (arm_kind(a), run_spec({**a, **steps}, s, lr, s["sweep"]["seed"], data))
        for a in plan["sweep_arms"]
        for lr in s["sweep"]["lrs"]
    ]


def choose_lrs(plan: dict[str, Any], runs: dict[str, dict], data: str) -> dict[str, float]:
    """Per arm kind, the sweep lr with the lowest val loss (a diverged run counts as +inf);
    kinds not swept (or not finished) are absent and train at the mode's lr."""
    best: dict[str, tuple[float, float]] = {}
    for kind, spec in sweep_specs(plan, data):
        r = runs.get(run_key(spec))
        if r is None:
            continue
        loss = r["val_loss"] if r["val_loss"] is not None else math.inf
        loss = loss if math.isfinite(loss) else math.inf
        if kind not in best or loss < best[kind][0]:
            best[kind] = (loss, spec["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def arm_lr(arm: dict[str, Any], plan: dict[str, Any], lrs: dict[str, float]) -> float:
    return lrs.get(arm_kind(arm), plan["settings"]["lr"])


def main_specs(plan: dict[str, Any], lrs: dict[str, float], data: str) -> list[tuple[dict, Spec]]:
    """(arm, spec) of every reported run: each arm on each of its seeds at its lr."""
    s = plan["settings"]
    return [
        (a, run_spec(a, s, arm_lr(a, plan, lrs), seed, data))
        for a in plan["arms"]
        for seed in a.get("seeds", s["seeds"])
    ]


def select_groups(plan: dict[str, Any], groups: list[str] | None) -> dict[str, Any]:
    if not groups:
        return plan
    known = {group_id(a, plan["settings"]) for a in plan["arms"]}
    if unknown := set(groups) - known:
        raise ValueError(f"unknown group(s) {sorted(unknown)}: use some of {sorted(known)}")
    arms = [a for a in plan["arms"] if group_id(a, plan["settings"]) in groups]
    kinds = {arm_kind(a) for a in arms}  # the sweep still runs where it would, for these kinds
    return {
        **plan,
        "arms": arms,
        "sweep_arms": [a for a in plan["sweep_arms"] if arm_kind(a) in kinds],
    }


def model_config(spec: Spec, cls):
    """The spec's model settings as `cls(**settings)`: a ModelConfig, or a dict for TrainConfig."""
    keys = ("n_heads", "seq_len", "d_model", "n_layers", "n_stages", "compression", "encoder")
    return cls(**{k: spec[k] for k in (*keys, "boundary_norm", "reembed")})
