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


def swarm_settings(cfg: Any, corpus_fp: str) -> dict[str, Any]:
    """What two processes must agree on to train one model together. `cfg` is any process
    config with the training settings (NodeConfig, CoordinatorConfig)."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json"),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "microbatches": cfg.microbatches,
        "corpus": corpus_fp,
        "codec": str(getattr(cfg.wire_codec, "value", cfg.wire_codec)),
    }


def fingerprint_of(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def swarm_fingerprint(cfg: Any, corpus_fp: str) -> str:
    return fingerprint_of(swarm_settings(cfg, corpus_fp))


def manifest_for(cfg: Any, corpus_fp: str, swarm: str) -> Manifest:
    settings = swarm_settings(cfg, corpus_fp)
    return Manifest(
        swarm=swarm,
        fingerprint=fingerprint_of(settings),
        version=VERSION,
        settings=settings,
        steps=cfg.steps,
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
