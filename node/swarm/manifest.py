"""The swarm's manifest: the settings every process of one swarm must share, and the check that
refuses a process whose settings differ (so nobody can fork a swarm by starting with another
config). Pure: no DHT, no torch; `records.Manifest` is the schema stored in the DHT.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from node.swarm.records import Manifest
from node.version import VERSION


class ManifestMismatch(ValueError):
    """This process's config is not the swarm's; the message lists every differing setting."""


class ManifestConflict(ValueError):
    """Several manifests of one swarm in the DHT, and no pinned signer to tell which counts."""


def swarm_settings(cfg: Any, data_fp: str) -> dict[str, Any]:
    """What two processes must agree on to train one model together. `cfg` is any process
    config with the training settings (NodeConfig, CoordinatorConfig). `data_fp` is the data
    fingerprint (tokenizer and tokens: node/data.py). The device is not here: nodes of one
    swarm may compute on different hardware; the precision is, since replicas of a stage
    average gradients and must compute them the same way."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json"),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "microbatches": cfg.microbatches,
        "data": data_fp,
        "codec": str(getattr(cfg.wire_codec, "value", cfg.wire_codec)),
        "precision": cfg.precision,
        "qat": cfg.qat,
        "schedule": getattr(cfg, "schedule", "1f1b"),  # every swarm process config has it
        # the overlapped rule's settings, only there (a 1f1b swarm's manifest is unchanged)
        **(
            {"overlap": cfg.overlap_mbs, "predict_weights": cfg.predict_weights}
            if getattr(cfg, "schedule", "1f1b") == "overlapped"
            else {}
        ),
        # and the prediction's scale where prediction is on and it is not the whole update: a
        # swarm of 0.13.0, before the setting existed, has the same manifest (a joiner reads a
        # missing scale as 1.0), and a scale of 0 is told apart from it
        **(
            {"predict_scale": cfg.predict_scale}
            if getattr(cfg, "schedule", "1f1b") == "overlapped"
            and cfg.predict_weights
            and cfg.predict_scale != 1.0
            else {}
        ),
    }


# manifest keys whose flag is not simply --key (what a mismatch message tells the user to set)
FLAG_OF = {
    "codec": "--wire-codec",
    "data": "--data",
    "precision": "--precision",
    "qat": "--qat",
    "schedule": "--schedule",
    "overlap": "--overlap",
    "predict_weights": "--predict-weights",
    "predict_scale": "--predict-scale",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "microbatches": "--microbatches",
    "model.n_stages": "--stages",
    "model.n_layers": "--n-layers",
    "model.d_model": "--d-model",
    "model.n_heads": "--n-heads",
    "model.seq_len": "--seq-len",
    "model.compression": "--compression",
    "model.vocab_size": "--vocab-size",
    "optim.name": "--optimizer",
    "optim.lr": "--lr",
}


def fingerprint_of(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def swarm_fingerprint(cfg: Any, data_fp: str) -> str:
    return fingerprint_of(swarm_settings(cfg, data_fp))


def manifest_for(cfg: Any, data_fp: str, swarm: str) -> Manifest:
    settings = swarm_settings(cfg, data_fp)
    return Manifest(
        swarm=swarm,
        fingerprint=fingerprint_of(settings),
        version=VERSION,
        settings=settings,
        steps=cfg.steps,
        data_source=getattr(cfg, "data_source", None),
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(swarm: Manifest, ours: Manifest) -> list[str]:
    """Human-readable list of what differs, e.g. "model.d_model: swarm 256, yours 512"."""
    theirs, mine = _flatten(swarm.settings), _flatten(ours.settings)
    lines = [
        f"{key}: swarm {theirs.get(key, '(unset)')!r}, yours {mine.get(key, '(unset)')!r}"
        + (f" ({FLAG_OF[key]})" if key in FLAG_OF else "")
        for key in sorted(set(theirs) | set(mine))
        if theirs.get(key) != mine.get(key)
    ]
    if swarm.steps != ours.steps:
        lines.append(f"steps: swarm {swarm.steps}, yours {ours.steps}")
    return lines


def check_manifest(swarm: Manifest, ours: Manifest) -> None:
    """Raise ManifestMismatch unless `ours` may join the swarm described by `swarm`."""
    if swarm.swarm != ours.swarm:
        raise ManifestMismatch(f"manifest is for swarm {swarm.swarm!r}, not {ours.swarm!r}")
    if swarm.version.split(".")[:2] != ours.version.split(".")[:2]:
        raise ManifestMismatch(
            f"swarm {swarm.swarm!r} runs resbm {swarm.version}; this is {ours.version}: "
            f"install resbm {swarm.version} to join it"
        )
    diff = differences(swarm, ours)
    if diff:
        raise ManifestMismatch(
            f"this config does not match swarm {swarm.swarm!r} (fingerprint {swarm.fingerprint}, "
            f"yours {ours.fingerprint}); change these settings to the swarm's:\n  "
            + "\n  ".join(diff)
        )
