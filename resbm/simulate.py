"""`resbm simulate`: a whole swarm on one machine, one real process per stage, gRPC on loopback.

The processes are the same `resbm node` daemons a volunteer runs; this module only launches them
(last stage first, so each node can dial the next one's port), watches their event logs for the
progress bar, and reaps them: every node runs in its own process group and asks the kernel to
kill it if we die, so nothing outlives a simulation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from node.config import MODEL_FLAGS, TrainConfig
from node.events import read_events
from node.settings import add_flags, from_args
from node.wire.kinds import WireCodec


class SimulateConfig(TrainConfig):
    wire_codec: WireCodec = WireCodec.bf16
    workdir: Path | None = Field(None, description="node logs, events, checkpoints; default tmp")
    startup_timeout_s: float = Field(120.0, gt=0)
    max_message_mb: float = Field(8.0, gt=0, description="per gRPC message; bigger is chunked")

    @model_validator(mode="after")
    def _pipeline(self) -> SimulateConfig:
        if self.model.n_stages < 2:
            raise ValueError("a swarm needs n_stages >= 2 (--stages); `resbm train` runs one stage")
        return self

    def train_config(self) -> TrainConfig:
        """The training settings alone: what the reference trainer would run."""
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


SIM_FLAGS: dict[str, tuple[str, dict]] = {
    **MODEL_FLAGS,
    "wire_codec": (
        "wire-codec",
        {"choices": [c.value for c in WireCodec], "help": "boundary tensor codec (default bf16)"},
    ),
    "workdir": ("workdir", {"help": "keep node logs, events and checkpoints here"}),
    "checkpoint_dir": ("checkpoint-dir", {"help": "stage checkpoints (default WORKDIR/ckpt)"}),
    "eval_batches": ("eval-batches", {"type": int}),
    "max_message_mb": ("max-message-mb", {"type": float, "help": "largest gRPC message (8)"}),
    "checkpoint_every": ("checkpoint-every", {"type": int, "help": "0 = only at the end"}),
    "resume": (
        "resume",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "every node continues from --checkpoint-dir",
        },
    ),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="a local swarm: one real node process per stage over loopback gRPC",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML file with settings")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true")
    add_flags(p, SIM_FLAGS)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    cfg = from_args(SimulateConfig, args, SIM_FLAGS)
    with contextlib.ExitStack() as stack:
        workdir = cfg.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="resbm-sim-"))
        )
        result = Swarm(cfg, Path(workdir)).run(progress=not args.no_progress)
        print_summary(result, sys.stderr if args.json else sys.stdout)  # logs still exist here
    if args.json:
        print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


@dataclass
class NodeProc:
    stage: int
    proc: subprocess.Popen
    events: Path
    log: Path
    port: int = 0
    start_step: int = 0


class Swarm:
    def __init__(self, cfg: SimulateConfig, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.ckpt = cfg.checkpoint_dir or workdir / "ckpt"
        self.nodes: list[NodeProc] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def _chunk_bytes(self) -> int:
        from node.daemon import link_settings
        from node.node_config import NodeConfig

        return link_settings(
            NodeConfig(model=self.cfg.model, max_message_mb=self.cfg.max_message_mb)
        ).chunk_bytes

    # ---- processes -------------------------------------------------------------------------
    def _threads(self) -> int:
        return self.cfg.threads or max(1, (os.cpu_count() or 1) // self.cfg.model.n_stages)

    def _launch(self, k: int, next_port: int | None) -> NodeProc:
        """Start `resbm node` for stage k with this run's exact resolved config (as JSON)."""
        from node.node_config import NodeConfig

        events, log = self.workdir / f"stage{k}.jsonl", self.workdir / f"stage{k}.log"
        node_cfg = NodeConfig(
            **{
                **self.cfg.train_config().model_dump(),
                "stage": k,
                "threads": self._threads(),
                "wire_codec": self.cfg.wire_codec,
                "max_message_mb": self.cfg.max_message_mb,
                "listen": "127.0.0.1:0",
                "next": f"127.0.0.1:{next_port}" if next_port else None,
                "events": events,
                "checkpoint_dir": self.ckpt,
            }
        )
        config = self.workdir / f"stage{k}.json"
        config.write_text(node_cfg.model_dump_json(indent=1))
        events.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "resbm.cli", "node", "--config", str(config)]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return NodeProc(k, proc, events, log)

    def _wait_ready(self, node: NodeProc) -> int:
        """The node's port, once its `ready` event is written (it records its start step)."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            for e in read_events(node.events):
                if e["event"] == "ready":
                    node.start_step = int(e["step"])
                    return int(e["port"])
            if node.proc.poll() is not None:
                raise RuntimeError(f"stage {node.stage} exited during start-up:\n{tail(node.log)}")
            time.sleep(0.1)
        raise RuntimeError(f"stage {node.stage} not ready after {self.cfg.startup_timeout_s}s")

    def launch(self) -> None:
        """Start every stage's node, last stage first so each can dial its successor."""
        next_port = None
        for k in reversed(range(self.cfg.model.n_stages)):
            node = self._launch(k, next_port)
            self.nodes.insert(0, node)
            node.port = next_port = self._wait_ready(node)

    def stop_all(self, grace_s: float = 30.0) -> None:
        """SIGTERM stage 0 (it finishes its step and ends the run everywhere), then SIGTERM the
        rest, then SIGKILL whatever is left: whole process groups, so nothing is orphaned."""
        for targets in (self.nodes[:1], self.nodes):
            for node in targets:
                if node.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s / 2
            while time.monotonic() < deadline and any(n.proc.poll() is None for n in self.nodes):
                time.sleep(0.1)
        self.kill_all()

    def kill_all(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)  # the group: children of nodes too
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)

    # ---- the run ---------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        ok, error = False, None
        try:
            self.launch()
            t0 = time.time()
            bar = tqdm(
                total=cfg.steps - self.nodes[-1].start_step,
                disable=not progress,
                unit="step",
                desc="simulate",
                dynamic_ncols=True,
            )
            losses: list[float] = []
            while any(n.proc.poll() is None for n in self.nodes):
                losses = self._losses()
                if len(losses) > bar.n:
                    bar.update(len(losses) - bar.n)
                    bar.set_postfix(
                        loss=f"{losses[-1]:.3f}",
                        tok_s=f"{self._tok_s(t0):.0f}",
                        kb_step=f"{self._bytes()[2] / max(1, len(losses)) / 1e3:.1f}",
                    )
                if any(n.proc.poll() not in (None, 0) for n in self.nodes):
                    break
                time.sleep(0.2)
            bar.close()
            codes = {n.stage: n.proc.poll() for n in self.nodes}
            done = cfg.steps - self.nodes[-1].start_step  # fewer after --resume
            ok = all(c == 0 for c in codes.values()) and len(self._losses()) == done
            if not ok:
                error = "; ".join(f"stage {k} exit {c}" for k, c in codes.items())
        except (RuntimeError, KeyboardInterrupt) as err:
            error = str(err) or type(err).__name__
        finally:
            self.stop_all()
        return self._result(ok, error, t0 if "t0" in locals() else time.time())

    def _losses(self) -> list[float]:
        last = self.nodes[-1].events
        return [e["loss"] for e in read_events(last) if e["event"] == "step"]

    def _bytes(self) -> tuple[int, int, int]:
        fwd = bwd = 0
        for n in self.nodes:
            steps = [e for e in read_events(n.events) if e["event"] in ("step", "exit")]
            if steps:
                fwd += steps[-1].get("bytes_forward", 0)
                bwd += steps[-1].get("bytes_backward", 0)
        return fwd, bwd, fwd + bwd

    def _tok_s(self, t0: float) -> float:
        events = [e for e in read_events(self.nodes[-1].events) if e["event"] == "step"]
        if not events:
            return 0.0
        return len(events) * self.cfg.tokens_per_step / max(events[-1]["time"] - t0, 1e-9)

    def _result(self, ok: bool, error: str | None, t0: float) -> dict[str, Any]:
        cfg, S = self.cfg, self.cfg.model.n_stages
        losses = self._losses()
        fwd, bwd, total = self._bytes()
        mbs = len(losses) * cfg.microbatches * (S - 1)  # boundary messages per direction
        from node.data import MicrobatchId
        from node.wire.messages import uncompressed_bf16_bytes

        shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.d_model)
        typical = MicrobatchId(cfg.steps // 2, cfg.microbatches // 2)
        per_mb = uncompressed_bf16_bytes(shape, self._chunk_bytes(), typical, 500_000)
        base = per_mb * mbs
        val = None
        if ok:
            val = final_val_loss(self.ckpt, cfg)
        return {
            "ok": ok,
            "error": error,
            "steps": len(losses),
            "train_loss": losses[-1] if losses else None,
            "val_loss": val,
            "loss_history": losses,
            "tokens": len(losses) * cfg.tokens_per_step,
            "tokens_per_s": self._tok_s(t0),
            "wire_bytes_forward": fwd,
            "wire_bytes_backward": bwd,
            "wire_bytes_per_step": total / max(1, len(losses)),
            "wire_compression_vs_bf16": base / total if total else None,
            "wire_codec": cfg.wire_codec.value,
            "stages": S,
            "d_model": cfg.model.d_model,
            "boundary_dim": cfg.model.boundary_dim,
            "compression": cfg.model.compression,
            "nodes": [
                {
                    "stage": n.stage,
                    "pid": n.proc.pid,
                    "port": n.port,
                    "exit_code": n.proc.poll(),
                    "log": str(n.log),
                }
                for n in self.nodes
            ],
            "checkpoint_dir": str(self.ckpt),
        }


def final_val_loss(ckpt: Path, cfg: TrainConfig) -> float:
    from node.checkpoint import load_model
    from node.data import Batches, Corpus
    from node.trainer import evaluate

    model, _ = load_model(ckpt)
    batches = Batches(Corpus.load(cfg.data), cfg.model.seq_len, cfg.batch_size, cfg.seed)
    return evaluate(model, batches, cfg.eval_batches)


def tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def print_summary(r: dict[str, Any], out) -> None:
    rows = [
        ("status", "ok" if r["ok"] else f"FAILED: {r['error']}"),
        ("stages / nodes", f"{r['stages']} / {len(r['nodes'])}"),
        ("steps", r["steps"]),
        ("train loss", f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"),
        ("val loss", f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"),
        ("tokens/s", f"{r['tokens_per_s']:.0f}"),
        (
            "boundary",
            f"{r['d_model']} -> {r['boundary_dim']} channels ({r['compression']}x), "
            f"{r['wire_codec']}",
        ),
        ("wire bytes fwd / bwd", f"{r['wire_bytes_forward']:,} / {r['wire_bytes_backward']:,}"),
        ("wire bytes per step", f"{r['wire_bytes_per_step']:,.0f}"),
        (
            "vs uncompressed bf16",
            f"{r['wire_compression_vs_bf16']:.1f}x fewer bytes"
            if r["wire_compression_vs_bf16"]
            else "-",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    if not r["ok"]:
        for n in r["nodes"]:
            print(f"--- stage {n['stage']} log ({n['log']}):\n{tail(Path(n['log']))}", file=out)
