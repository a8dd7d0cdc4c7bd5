"""`resbm export`: gather the newest checkpoint of every stage into one model directory.

A swarm keeps its model in pieces: each node writes its own stage's file, possibly on another
machine and at another step. Export picks, per stage, the newest file it can read, checks that
the pieces belong to one model (same model config; a stage missing is an error, stages at
different steps a warning that names them), and writes a directory that `resbm sample` loads:
`stage-K.safetensors` for every stage plus `export.json` (step per stage, swarm id, where each
file came from).

Sources: local directories (`--checkpoint-dir DIR...`, e.g. the shared `ckpt/` of `resbm
simulate` or one directory per node), or a running swarm (`--swarm ID --initial-peers ...`
`--checkpoint-dir DIR...`), whose DHT says which node checkpointed which stage at which step, and
in which directory by a tag (never its path, which would tell every reader its user names):
export uses the newest stage files in the directories given whose tag a node announced, and
says which stages it could not find here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_RE = re.compile(r"^stage-(\d+)\.safetensors$")


class ExportError(ValueError):
    """The stages found do not make one model; the message says what is missing or differs."""


@dataclass(frozen=True)
class StageFile:
    stage: int
    step: int
    path: Path
    model: dict[str, Any]
    node: str | None = None  # the announcing node, for a file found through the DHT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="gather the newest stage checkpoints into one model directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument(
        "--checkpoint-dir",
        nargs="+",
        required=True,
        help="local directories with stage files (with --swarm: where to look for the ones "
        "its nodes announced)",
    )
    p.add_argument("--swarm", help="swarm id: take the checkpoints its DHT announces")
    p.add_argument("--initial-peers", nargs="+", default=[], help="DHT multiaddrs (--swarm)")
    p.add_argument("--token-file", help="a private swarm's access token (--swarm)")
    p.add_argument(
        "--coordinator-id",
        metavar="ID",
        help="take only this coordinator's manifest (--swarm; default: the manifests must agree)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="DHT timeout in s (default 30)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export in --out")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.swarm:
        if not args.initial_peers:
            raise ExportError("--swarm needs --initial-peers (any DHT peer of the swarm)")
        found, unreachable, n_stages = from_swarm(
            args.swarm, args.initial_peers, _token(args.token_file), args.timeout,
            args.checkpoint_dir, _coordinator_id(args.coordinator_id),
        )  # fmt: skip
    else:
        found, unreachable, n_stages = scan(args.checkpoint_dir), {}, None
    chosen, warnings = choose(found, n_stages, unreachable)
    for w in warnings:
        print(f"resbm export: warning: {w}", file=sys.stderr)
    info = write(Path(args.out), chosen, args.swarm, warnings, force=args.force)
    steps = ", ".join(f"stage {s['stage']}: step {s['step']}" for s in info["stages"])
    print(f"exported {len(chosen)} stages to {args.out} ({steps})")
    return 0


def _token(token_file: str | None) -> str | None:
    import os

    if token_file:
        lines = Path(token_file).read_text().strip().splitlines()
        return lines[0].strip() if lines else None
    return os.environ.get("RESBM_SECURITY__TOKEN")


# ---- finding stage files ---------------------------------------------------------------------
def read_stage_file(path: Path, node: str | None = None) -> StageFile:
    from node.checkpoint import read_stage_meta

    try:
        meta = read_stage_meta(path)
        return StageFile(int(meta["stage"]), int(meta["step"]), path, json.loads(meta["model"]))
    except Exception as err:  # a file that is not a stage checkpoint of ours
        raise ExportError(f"{path} is not a readable stage checkpoint: {err}") from None


def scan(directories: list[str]) -> list[StageFile]:
    """Every stage file directly in `directories` (temp files of a writer are never matched)."""
    found = []
    for d in map(Path, directories):
        if not d.is_dir():
            raise ExportError(f"--checkpoint-dir {d} is not a directory")
        files = sorted(p for p in d.iterdir() if STAGE_RE.match(p.name) and p.is_file())
        if not files:
            print(f"resbm export: warning: no stage checkpoints in {d}", file=sys.stderr)
        found += [read_stage_file(p) for p in files]
    return found


def _coordinator_id(value: str | None) -> str | None:
    from node.wire.kinds import NODE_ID_PATTERN

    if value is not None and not re.match(NODE_ID_PATTERN, value):
        raise ExportError(f"--coordinator-id {value!r} is not a node id (n-...)")
    return value


def from_swarm(
    swarm: str,
    peers: list[str],
    token: str | None,
    timeout_s: float,
    directories: list[str],
    coordinator_id: str | None = None,
) -> tuple[list[StageFile], dict[int, list[str]], int]:
    """The stage files a running swarm announced in its DHT that are in `directories`; per
    stage, what was announced but is not here; and the swarm's number of stages. The number
    of stages is the manifest's: `coordinator_id`'s alone if given (#10 M1), else the one
    every manifest there agrees on."""
    import asyncio

    from node.swarm.dht import SwarmDHT, start_dht

    dht = start_dht(peers, None, token, swarm=swarm)  # forks: before torch
    try:
        sdht = SwarmDHT(dht, swarm, timeout_s)

        async def read():
            manifest = await sdht.get_manifest(strict=True, signer=coordinator_id)
            if manifest is None:
                return None, {}
            n = int(manifest.settings["model"]["n_stages"])
            recs = await asyncio.gather(*(sdht.checkpoints(k) for k in range(n)))
            return n, dict(enumerate(recs))

        from node.swarm.dht import DHTUnavailable

        try:
            n_stages, records = asyncio.run(read())
        except DHTUnavailable as err:
            raise ExportError(f"{err}: check --initial-peers and the network") from None
        except ValueError as err:  # several manifests (ManifestConflict)
            raise ExportError(str(err)) from None
    finally:
        dht.shutdown()
    if n_stages is None:
        whose = f" sealed by --coordinator-id {coordinator_id}" if coordinator_id else ""
        raise ExportError(
            f"no swarm {swarm!r} found through {' '.join(peers)} (no manifest{whose})"
        )
    from node.swarm.records import checkpoint_place

    for d in directories:
        if not Path(d).is_dir():
            raise ExportError(f"--checkpoint-dir {d} is not a directory")
    here = {checkpoint_place(d, swarm): Path(d) for d in directories}
    found, unreachable = [], {}
    for k, recs in records.items():
        for rec in sorted(recs.values(), key=lambda r: -r.step):
            path = here[rec.place] / f"stage-{k}.safetensors" if rec.place in here else None
            if path is not None and path.is_file():
                f = read_stage_file(path, rec.peer_id)
                found.append(StageFile(f.stage, f.step, f.path, f.model, rec.peer_id))
            else:
                where = f"step {rec.step} by node {rec.peer_id}"
                unreachable.setdefault(k, []).append(where)
    return found, unreachable, n_stages


# ---- checking and writing --------------------------------------------------------------------
def choose(
    found: list[StageFile], n_stages: int | None = None, unreachable: dict | None = None
) -> tuple[dict[int, StageFile], list[str]]:
    """Per stage the newest file; raises ExportError when the files are of different models
    or a stage is missing. Returns the choice and warnings (stages at different steps)."""
    unreachable = unreachable or {}
    if not found and not unreachable:
        raise ExportError("no stage checkpoints found")
    configs: dict[str, list[Path]] = {}
    for f in found:
        configs.setdefault(json.dumps(f.model, sort_keys=True), []).append(f.path)
    if len(configs) > 1:
        listing = "; ".join(
            f"{_brief(json.loads(c))}: {', '.join(map(str, paths))}" for c, paths in configs.items()
        )
        raise ExportError(f"the stage checkpoints are of different models: {listing}")
    model = found[0].model if found else {}
    n = n_stages or int(model.get("n_stages", 0))
    chosen: dict[int, StageFile] = {}
    for f in found:
        if not 0 <= f.stage < n:
            raise ExportError(f"{f.path} is stage {f.stage}, but the model has {n} stages")
        if f.stage not in chosen or f.step > chosen[f.stage].step:
            chosen[f.stage] = f
    missing = [k for k in range(n) if k not in chosen]
    if missing:
        lines = [f"stage {k} of {n} is missing" for k in missing]
        for k in missing:
            if k in unreachable:
                lines[missing.index(k)] += (
                    " here: the swarm announced it only in other directories ("
                    + ", ".join(unreachable[k])
                    + "; copy that node's checkpoint here and give its --checkpoint-dir)"
                )
        raise ExportError("; ".join(lines))
    warnings = []
    for k, where in sorted(unreachable.items()):  # newer ones elsewhere than what we use
        if k in chosen:
            warnings.append(f"stage {k}: also announced ({', '.join(where)}), not found here")
    steps = {k: f.step for k, f in chosen.items()}
    if len(set(steps.values())) > 1:
        listing = ", ".join(f"stage {k} at step {s}" for k, s in sorted(steps.items()))
        warnings.append(
            f"the stages are at different steps ({listing}): the model mixes them; "
            "export again after every stage has checkpointed the same step for an exact model"
        )
    return chosen, warnings


def _brief(model: dict[str, Any]) -> str:
    keys = ("n_stages", "n_layers", "d_model", "compression")
    return " ".join(f"{k}={model.get(k)}" for k in keys)


def write(
    out: Path,
    chosen: dict[int, StageFile],
    swarm: str | None,
    warnings: list[str],
    force: bool = False,
) -> dict[str, Any]:
    from node.checkpoint import EXPORT_FILE, atomic_copy, atomic_write_bytes, read_stage_meta
    from node.tokenizer import TOKENIZER_FILE

    sources = {f.path.parent.resolve() for f in chosen.values()}
    if out.resolve() in sources:
        raise ExportError(f"--out {out} is one of the source directories: choose another")
    if out.exists() and not force and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty (pass --force to overwrite)")
    stages = []
    for k, f in sorted(chosen.items()):
        dst = atomic_copy(f.path, out / f"stage-{k}.safetensors")
        step = int(read_stage_meta(dst)["step"])  # the file may have been replaced meanwhile
        stages.append({"stage": k, "step": step, "source": str(f.path.resolve()), "node": f.node})
    info = {
        "swarm": swarm,
        "exported_at": time.time(),
        "model": next(iter(chosen.values())).model,
        "stages": stages,
        "steps_differ": len({s["step"] for s in stages}) > 1,
        "warnings": warnings,
    }
    for f in chosen.values():  # stage 0 and the last stage save the tokenizer beside them
        tokenizer = f.path.parent / TOKENIZER_FILE
        if tokenizer.is_file():
            atomic_copy(tokenizer, out / TOKENIZER_FILE)
            break
    atomic_write_bytes(out / EXPORT_FILE, json.dumps(info, indent=1).encode())
    return info
