"""Per-stage checkpoints: one safetensors file per stage, written atomically.

Each file holds the stage's parameters and its optimizer tensors; the JSON-able rest (model
config, step, optimizer hyper-parameters) sits in the safetensors header metadata, so a stage's
checkpoint is one file that is either fully there or not there at all (write to a temp file in
the same directory, fsync, rename). A node in a swarm writes exactly the same file for its stage.

No RNG state and no data cursor are saved because none exist: training uses no randomness after
the seeded init (no dropout), and a microbatch's data is a function of (seed, step, index), so the
step number *is* the data position. That is why a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from node.model.config import ModelConfig
from node.model.resbm import ResBM
from node.runtime import StageRuntime

STAGE_FILE = "stage-{k}.safetensors"
PREVIOUS_FILE = "stage-{k}.previous.safetensors"  # the generation before: kept when saving
SAVE_LOCK = ".resbm-save.lock"  # held while a swarm node saves (replicas may share a directory)


class NotFinite(ValueError):
    """The state to save holds NaN or inf: saving it would replace the last good one."""


RUN_FILE = "run.json"
EXPORT_FILE = "export.json"  # written by `resbm export`: where each stage came from
log = logging.getLogger(__name__)


def _tmp_path(path: Path) -> Path:
    """Where `path` is written before its rename: hidden, and named by our pid, so a later
    save can tell the leftovers of a killed writer from a live writer's file (replicas of one
    stage may share a directory)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _clean_stale_tmp(path: Path) -> None:
    """Remove temp files that a writer killed mid-save (SIGKILL, power loss) left behind.
    They are never read as checkpoints (loads open only the final names); this only frees
    the disk."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: until the directory entry is on disk, a power loss can bring
    back the old name (or none)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy a stage file (one open of `src`: a writer replacing it meanwhile does not mix two
    versions) the way save_stage writes: temp file, fsync, rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(dst)
    tmp = _tmp_path(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _split_optimizer(opt: torch.optim.Optimizer, o: int) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{o}.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, o: int) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{o}."
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[key] = t
    for name, v in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def stage_state(runtime: StageRuntime, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The stage's parameters + optimizer tensors, and the JSON-able rest, as of the *start* of
    `step`: what a checkpoint holds, and what a joining replica downloads."""
    # on the host, whatever the device: files, and hivemind's state sharing, hold CPU tensors
    tensors = {
        f"param.{n}": p.detach().cpu().contiguous() for n, p in runtime.stage.state_dict().items()
    }
    optim_meta = []
    for o, opt in enumerate(runtime.optimizers):
        t, m = _split_optimizer(opt, o)
        tensors.update(t)
        optim_meta.append(m)
    # the overlapped schedule's weight versions (StageRuntime.versions), by parameter name
    names = [n for n, _ in runtime.stage.named_parameters()]
    for kind, version in runtime.versions(step).items():
        for n, t in zip(names, version, strict=True):
            tensors[f"{kind}.{n}"] = t.detach().cpu().contiguous()
    meta = {
        "stage": str(runtime.index),
        "step": str(step),
        "model": runtime.stage.cfg.model_dump_json(),
        "optim": json.dumps(optim_meta),
    }
    return tensors, meta


def state_digest(tensors: dict[str, torch.Tensor], meta: dict, group0=None, begun0=None) -> str:
    """SHA-256 of what a joiner takes from a state (stage_state's output): the stage, the step,
    every tensor (name, dtype, shape, bytes) and the optimizer's scalar state. Not the
    optimizer's settings (a joiner keeps its own: load_stage_state) nor the model config
    (checked on load). Replicas that applied the same updates to the same bits hold the same
    digest, so a joiner can check a download against what other replicas vouch for (#10 C2).
    `group0` (stage 0): the split of the step among its replicas, which a joiner takes with
    the state (the replicas of the last round hold the same one); a split of one member is
    left out: a joiner takes only a split that names it (syncing.split_naming), and replicas
    hold different ones of their own (at start, resumed, applying alone). Raises on a
    malformed meta or group0 (a peer's input). `begun0` (overlapped): the ids of the step each
    member of the split began early, which the split leaves theirs (routing.split_share)."""
    h = hashlib.sha256()

    def field(data) -> None:  # length-prefixed: no name can absorb the next field
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    field(f"resbm-state/3 {int(meta['stage'])} {int(meta['step'])}".encode())
    optim = json.loads(meta["optim"])  # the scalars, and which parameter each state is of
    groups = [[g["params"] for g in m["param_groups"]] for m in optim]
    field(json.dumps([[m["scalars"] for m in optim], groups], sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise ValueError(f"a tensor named {type(name).__name__}, not str")
        t = tensors[name].detach().cpu().contiguous()
        field(f"{name}\0{t.dtype}\0{tuple(t.shape)}".encode())
        field(t.reshape(-1).view(torch.uint8).numpy().data)  # 1-D uint8: len() is its bytes
    if group0 and len(group0) > 1:  # a split of one (a placeholder, or a replica alone)
        split = sorted((str(n), float(t)) for n, t in group0)  # names no joiner: not taken
        field(json.dumps(split).encode())
        if begun0:
            begun = sorted((str(n), sorted(int(i) for i in ids)) for n, ids in begun0.items())
            field(json.dumps(begun).encode())
    return h.hexdigest()


VERSION_KINDS = ("early", "update")  # StageRuntime.versions


def load_stage_state(runtime: StageRuntime, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Restore what stage_state returned, in place; returns the step to continue from."""
    saved_cfg = json.loads(meta["model"])
    if ModelConfig.model_validate(saved_cfg) != runtime.stage.cfg:  # new fields: defaults
        raise ValueError(
            f"stage state was written for another model config: {saved_cfg}; "
            "run with the same model settings"
        )
    if int(meta["stage"]) != runtime.index:
        raise ValueError(f"stage state is for stage {meta['stage']}, not {runtime.index}")
    runtime.stage.load_state_dict(_params(tensors), strict=True)
    for o, (opt, m) in enumerate(zip(runtime.optimizers, json.loads(meta["optim"]), strict=True)):
        # which parameter each optimizer tensor is of, by position: ours, or a donor could
        # hand one parameter's momentum to another (review of #10 C2)
        ours = [g["params"] for g in opt.state_dict()["param_groups"]]
        if [g["params"] for g in m["param_groups"]] != ours:
            raise ValueError(f"optimizer {o}'s parameter groups are not this stage's")
        # load_state_dict takes the saver's param groups whole: every setting but the state
        # tensors stays ours. Implementation flags: a CPU replica's state must not turn off
        # this GPU's fused AdamW (or the reverse). The rest is the same config for every
        # honest replica (lr is set each step): a donor's lr_scale or betas are not taken (#10)
        own = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(_join_optimizer(tensors, m, o))
        for group, flags in zip(opt.param_groups, own, strict=True):
            group.update(flags)
    step = int(meta["step"])
    names = [n for n, _ in runtime.stage.named_parameters()]
    versions = {}
    for kind in VERSION_KINDS:
        if any(f"{kind}.{n}" in tensors for n in names):
            if missing := [n for n in names if f"{kind}.{n}" not in tensors]:
                raise ValueError(f"the state's {kind} version lacks {missing[0]}")
            versions[kind] = [tensors[f"{kind}.{n}"] for n in names]
    if versions and not runtime.overlap:
        raise ValueError("the state is an overlapped run's: run with --schedule overlapped")
    if runtime.overlap and step > 0 and "early" not in versions:
        raise ValueError("the state has no early version (not an overlapped run's, or too old)")
    runtime.load_versions(step, versions)
    return step


def save_stage(
    directory: str | Path, runtime: StageRuntime, step: int, shared_since: float | None = None
) -> Path | None:
    """Save stage parameters + optimizer state as of the *start* of `step`, and, from a stage
    that holds the data (stage 0, the last), the tokenizer `resbm sample` decodes with.

    `shared_since` (a swarm node: when it started, wall clock): replicas of one stage may share
    the directory, and one that lags (its last round failed when its sibling's did not, then it
    was stopped) must not replace what its sibling saved, or the stages' files end at different
    steps and the run cannot be loaded (a flaky CI run). So when the file holds a later step of
    this stage and model, written since `shared_since` (by a sibling of this run: an older run's
    file is replaced as before), nothing is written and None is returned."""
    tensors, meta = stage_state(runtime, step)
    bad = [n for n, x in tensors.items() if x.is_floating_point() and not torch.isfinite(x).all()]
    if bad:  # never over the last good generation, nor announced for recovery (#10 M6)
        raise NotFinite(f"stage {runtime.index} at step {step}: {bad[0]} is not finite")
    path = Path(directory) / STAGE_FILE.format(k=runtime.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _save_lock(path.parent) if shared_since is not None else contextlib.nullcontext():
        newer = None if shared_since is None else _newer_step(path, meta, shared_since)
        if newer is not None:
            log.warning(
                "stage %d: not saved at step %d: a replica sharing %s saved step %d since",
                runtime.index, step, path.parent, newer,
            )  # fmt: skip
            return None
        tokenizer = getattr(runtime.batches.corpus, "tokenizer", None)
        if tokenizer is not None:
            save_tokenizer(directory, tokenizer)
        _write_stage(path, runtime.index, tensors, meta)
    return path


@contextlib.contextmanager
def _save_lock(directory: Path):
    """One saver of a shared directory at a time (on this machine: a lock across machines is
    not promised by every network file system), so the check and the replace are one act.
    Where the file system cannot lock, the save goes on unlocked."""
    try:
        fd = os.open(directory / SAVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        log.debug("checkpoint lock not taken: %s", err)
        yield
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("checkpoint lock not taken: %s", err)
        yield
    finally:
        os.close(fd)  # releases the lock


def _newer_step(path: Path, meta: dict[str, str], since: float) -> int | None:
    """The step of the stage file at `path` when it is later than `meta`'s, of the same model
    and stage, and was written since `since`; else None."""
    try:
        written = path.stat().st_mtime
        theirs = read_stage_meta(path)
        step = int(theirs["step"])
    except Exception:  # safetensors' own error type: missing, or not a file we wrote whole
        return None
    same = theirs.get("model") == meta["model"] and theirs.get("stage") == meta["stage"]
    return step if same and written >= since and step > int(meta["step"]) else None


def _write_stage(path: Path, k: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    _clean_stale_tmp(path)
    tmp = _tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # two generations: the last one becomes the previous through a hard link, so the
        # newest name never goes missing (an export or a resume reading it meanwhile found
        # no file). Replicas of one stage may share a directory and save at once: the other
        # may have replaced it under us, which is fine
        previous = path.with_name(PREVIOUS_FILE.format(k=k))
        _clean_stale_tmp(previous)
        linked = _tmp_path(previous)
        try:
            os.link(path, linked)
            os.replace(linked, previous)
        except OSError as err:  # no last one yet, or a file system without hard links
            if not isinstance(err, FileNotFoundError):
                log.debug("no previous generation kept: %s", err)
        finally:  # rename() of two links to one file (a save killed between the two renames
            linked.unlink(missing_ok=True)  # left `previous` = `path`) does nothing: POSIX
        os.replace(tmp, path)  # a crash before this line leaves the last good file untouched
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_stage_meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_stage(directory: str | Path, runtime: StageRuntime) -> int:
    """Restore a stage in place; returns the step to continue from. The newest generation,
    or the one before when the newest is missing (a crash between the two renames of a save)
    or unreadable."""
    path = Path(directory) / STAGE_FILE.format(k=runtime.index)
    previous = Path(directory) / PREVIOUS_FILE.format(k=runtime.index)
    if not path.is_file() and not previous.is_file():
        raise FileNotFoundError(f"no checkpoint for stage {runtime.index} at {path}")
    try:
        tensors, meta = _read(path)
    except (FileNotFoundError, ValueError) as err:
        if not previous.is_file():
            raise
        log.warning("%s; loading the generation before it, %s", err, previous.name)
        path = previous
        tensors, meta = _read(path)
    try:
        return load_stage_state(runtime, tensors, meta)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}; or use another --checkpoint-dir") from None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing")
    try:
        tensors, meta = load_file(str(path)), read_stage_meta(path)
    except Exception as err:  # safetensors' own error type: not a file we wrote whole
        raise ValueError(f"checkpoint {path} is unreadable: {err}") from None
    return tensors, meta


def _params(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n[len("param.") :]: t for n, t in tensors.items() if n.startswith("param.")}


def load_model(directory: str | Path) -> tuple[ResBM, int]:
    """Rebuild the whole model from its stage files (what `resbm sample` and export need)."""
    directory = Path(directory)
    first = directory / STAGE_FILE.format(k=0)
    if not first.is_file():
        raise FileNotFoundError(f"no stage checkpoints in {directory} (expected {first.name})")
    cfg = ModelConfig.model_validate_json(read_stage_meta(first)["model"])
    model, steps = ResBM(cfg), set()
    for k, stage in enumerate(model.stages()):
        path = directory / STAGE_FILE.format(k=k)
        if not path.is_file():
            raise FileNotFoundError(f"stage {k} of {cfg.n_stages} is missing: {path}")
        steps.add(int(read_stage_meta(path)["step"]))
        stage.load_state_dict(_params(load_file(str(path))), strict=True)
    if len(steps) != 1:
        if not (directory / EXPORT_FILE).is_file():
            raise ValueError(f"stage checkpoints in {directory} are from different steps: {steps}")
        # an export of a swarm whose stages checkpointed at different steps (it warned then)
        log.warning("%s: the stages are from different steps %s", directory, sorted(steps))
    return model, min(steps)


def save_run(directory: str | Path, info: dict[str, Any]) -> None:
    """The run-level record (config, step, loss history); written after every stage file."""
    atomic_write_bytes(Path(directory) / RUN_FILE, json.dumps(info, indent=1).encode())


def load_run(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing {RUN_FILE})")
    return json.loads(path.read_text())


# ---- the tokenizer a checkpoint was trained with -------------------------------------------
TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(directory: str | Path, tokenizer) -> Path:
    """Write the tokenizer's definition ({"spec": "bytes"}, or a BPE's tokenizer.json) next to
    the stage files, so `resbm sample` and an export decode with what the model learned, even
    away from the data. Written atomically; unchanged content is not rewritten."""
    path = Path(directory) / TOKENIZER_FILE
    text = tokenizer.definition()
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_bytes(path, text.encode("utf-8"))
    return path


def load_tokenizer(directory: str | Path, vocab_size: int | None = None):
    """The tokenizer saved by `save_tokenizer`; the byte tokenizer when there is none (every
    checkpoint from before tokenizers were saved was trained on bytes), unless the model's
    `vocab_size` says it was not."""
    from node.tokenizer import ByteTokenizer, from_file

    path = Path(directory) / TOKENIZER_FILE
    if path.is_file():
        return from_file(path)
    if vocab_size not in (None, ByteTokenizer.vocab_size):
        raise FileNotFoundError(
            f"{path} is missing and the model's vocabulary is {vocab_size}, not bytes: copy the "
            "training data's tokenizer.json there"
        )
    return ByteTokenizer()
