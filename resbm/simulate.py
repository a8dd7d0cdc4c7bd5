"""`resbm simulate`: a whole swarm on one machine: a coordinator and S x R real node processes
(S stages, R replicas each), gRPC on loopback, peers found through hivemind's DHT.

The processes are the same `resbm coordinator` and `resbm node` daemons a volunteer runs; this
module only launches them, watches their event logs for the progress bar, and reaps them. With
`--chaos` it SIGKILLs random nodes mid-run (seeded; whole process groups) and starts replacements,
which join through the coordinator and download their stage's state from a replica; the result
counts what was recomputed and proves nothing was lost.

Logs, event logs and stage checkpoints go to --workdir, by default a new folder
./resbm-sim-YYYYmmdd-HHMMSS that is kept: the summary ends with a `resbm sample` line for it.
Ctrl-C stops the run cleanly: every node finishes its step and checkpoints it, the summary says
"stopped at step N", and the exit status is 130 (the usual one for an interrupt).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from node.config import MODEL_FLAGS, TRAIN_FLAGS, TrainConfig
from node.settings import add_flags, from_args
from node.wire.kinds import WireCodec
from resbm.launcher import Launcher, Proc, tail
from resbm.wan import LinkSpec, Sever, WanEmulator


class SimulateConfig(TrainConfig):
    wire_codec: WireCodec = WireCodec.int4_channel  # see ModelConfig.compression
    workdir: Path | None = Field(
        None, description="node logs, events, checkpoints; default ./resbm-sim-<timestamp>"
    )
    startup_timeout_s: float = Field(120.0, gt=0)
    max_message_mb: float = Field(8.0, gt=0, description="per gRPC message; bigger is chunked")
    replicas: int = Field(1, ge=1, description="nodes per stage")
    swarm: str = Field("sim", description="swarm id")
    fixed_stages: bool = Field(False, description="node i serves stage i // replicas")
    chaos: bool = Field(False, description="SIGKILL random nodes mid-run and start replacements")
    chaos_seed: int = Field(0, ge=0)
    chaos_interval_s: float = Field(15.0, gt=0, description="mean seconds between kills")
    chaos_restart_s: float = Field(2.0, ge=0, description="seconds before a replacement starts")
    matchmaking_s: float = Field(1.0, gt=0, description="averaging: max wait to form a group")
    link: str | None = Field(
        None, description="emulated WAN link of every inter-stage connection: RATE:LATENCY[:JITTER]"
    )
    sever: list[str] = Field(
        default_factory=list, description="AT[:DOWN] s after the swarm is up: reset links"
    )
    link_seed: int = Field(0, ge=0, description="seed of the link jitter")
    max_in_flight: int = Field(
        0, ge=0, description="stage 0's microbatches in flight; 0 = sized at run time"
    )

    @model_validator(mode="after")
    def _pipeline(self) -> SimulateConfig:
        if self.model.n_stages < 2:
            raise ValueError("a swarm needs n_stages >= 2 (--stages); `resbm train` runs one stage")
        if self.chaos and self.replicas < 2:
            raise ValueError("chaos needs replicas >= 2 (--replicas): a kill must leave a replica")
        if self.link is not None and self.link.strip().lower() == "none":
            self.link = None
        spec = self.link_spec()  # errors name --link / --sever
        severs = [Sever.parse(t) for t in self.sever]
        if severs and spec is None:
            raise ValueError("--sever cuts emulated links: give --link RATE:LATENCY too")
        return self

    def link_spec(self) -> LinkSpec | None:
        return LinkSpec.parse(self.link) if self.link else None

    def train_config(self) -> TrainConfig:
        """The training settings alone: what the reference trainer would run."""
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


SIM_FLAGS: dict[str, tuple[str, dict]] = {
    **MODEL_FLAGS,
    "wire_codec": (
        "wire-codec",
        {
            "choices": [c.value for c in WireCodec],
            "help": "boundary tensor codec (default int4-channel)",
        },
    ),
    "replicas": ("replicas", {"type": int, "help": "nodes per stage (default 1)"}),
    **{k: TRAIN_FLAGS[k] for k in ("schedule", "overlap", "predict_weights", "predict_scale")},
    "max_in_flight": (
        "max-in-flight",
        {"type": int, "metavar": "N", "help": "microbatches in flight (0: sized at run time)"},
    ),
    "chaos": (
        "chaos",
        {"action": argparse.BooleanOptionalAction, "help": "kill and restart nodes"},
    ),
    "chaos_seed": ("chaos-seed", {"type": int, "help": "seed of the kills (default 0)"}),
    "chaos_interval_s": ("chaos-interval", {"type": float, "help": "mean s between kills (15)"}),
    "workdir": (
        "workdir",
        {"help": "node logs, events and checkpoints (default: a new ./resbm-sim-<timestamp>)"},
    ),
    "checkpoint_dir": ("checkpoint-dir", {"help": "stage checkpoints (default WORKDIR/ckpt)"}),
    "eval_batches": (
        "eval-batches",
        {"type": int, "help": "batches of the final validation loss (default 8)"},
    ),
    "max_message_mb": ("max-message-mb", {"type": float, "help": "largest gRPC message (8)"}),
    "checkpoint_every": ("checkpoint-every", {"type": int, "help": "0 = only at the end"}),
    "link": (
        "link",
        {
            "metavar": "RATE:LATENCY[:JITTER]",
            "help": "emulate this WAN link on every inter-stage connection, each direction "
            "(e.g. 80mbit:40ms or 10mbps:40ms:5ms; RATE in bit, kbit, mbit, gbit or bps, "
            "kbps, mbps, gbps, all bits a second; `none`: plain loopback)",
        },
    ),
    "sever": (
        "sever",
        {
            "nargs": "+",
            "metavar": "AT[:DOWN]",
            "help": "reset every emulated link AT s after the swarm is up; refuse new "
            "connections for DOWN s (e.g. 30s:2s)",
        },
    ),
    "link_seed": ("link-seed", {"type": int, "help": "seed of the link jitter (default 0)"}),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="a local swarm: a coordinator and S x R node processes over loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML file with settings")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    add_flags(p, SIM_FLAGS)
    p.set_defaults(handler=main)


EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's code for SIGINT, as every resbm command uses


def default_workdir(now: float | None = None) -> Path:
    """A new folder in the current directory, named by the local time (kept after the run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path, n = Path(f"resbm-sim-{stamp}"), 1
    while path.exists():  # two runs started within a second
        n += 1
        path = Path(f"resbm-sim-{stamp}-{n}")
    return path


def main(args: argparse.Namespace) -> int:
    cfg = from_args(SimulateConfig, args, SIM_FLAGS)
    workdir = Path(cfg.workdir) if cfg.workdir else default_workdir()
    n = cfg.model.n_stages * cfg.replicas
    print(
        f"resbm simulate: logs and checkpoints in {workdir}/ (kept; --workdir DIR to choose)\n"
        f"starting coordinator + {n} node{'s' if n != 1 else ''}...",
        file=sys.stderr,
        flush=True,
    )
    result = Swarm(cfg, workdir).run(progress=not args.no_progress)
    print_summary(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result), flush=True)
    if result.get("stopped"):
        return EXIT_INTERRUPTED
    return 0 if result["ok"] else 1


class Swarm:
    def __init__(self, cfg: SimulateConfig, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.ckpt = cfg.checkpoint_dir or workdir / "ckpt"
        spec = cfg.link_spec()
        self.wan = (
            WanEmulator(spec, tuple(Sever.parse(t) for t in cfg.sever), cfg.link_seed)
            if spec
            else None
        )
        self.launcher = Launcher(workdir, cfg.startup_timeout_s, wan=self.wan)
        self.rejoins = 0
        self.killed_on_stop = False  # a second Ctrl-C killed the nodes instead of draining
        self.t0 = time.time()

    @property
    def nodes(self) -> list[Proc]:
        return self.launcher.nodes

    def _chunk_bytes(self) -> int:
        from node.node_config import NodeConfig
        from node.peering import link_settings

        return link_settings(
            NodeConfig(model=self.cfg.model, max_message_mb=self.cfg.max_message_mb)
        ).chunk_bytes

    def _threads(self) -> int:
        n = self.cfg.model.n_stages * self.cfg.replicas
        return self.cfg.threads or max(1, (os.cpu_count() or 1) // n)

    # ---- processes -------------------------------------------------------------------------
    def coordinator_config(self):
        from coordinator.config import CoordinatorConfig

        return CoordinatorConfig(
            **self.cfg.train_config().model_dump(),  # the wire codec and qat included
            swarm=self.cfg.swarm,
            listen="127.0.0.1:0",
            dht_listen=["/ip4/127.0.0.1/tcp/0"],
            record_ttl_s=5.0,
            placeholder_ttl_s=5.0,
            rebalance_every_s=0,
            identity_file=self.workdir / "coordinator.key",  # a restart is the same coordinator
        )

    def node_config(self, stage: int | None = None, **over):
        from node.node_config import NodeConfig

        cfg = self.cfg
        return NodeConfig(
            **{
                **cfg.train_config().model_dump(),
                "threads": self._threads(),
                "wire_codec": cfg.wire_codec,
                "max_message_mb": cfg.max_message_mb,
                "listen": "127.0.0.1:0",
                "checkpoint_dir": self.ckpt,
                "checkpoint_every": cfg.checkpoint_every or (1 if cfg.chaos else 0),
                "swarm": cfg.swarm,
                "replicas_hint": cfg.replicas,
                "matchmaking_s": cfg.matchmaking_s,
                "allreduce_timeout_s": 10.0,
                "max_in_flight": cfg.max_in_flight,
                "stage": stage or 0,
                "wanted_stage": stage,
                **over,
            }
        )

    def launch(self, overrides: dict[int, dict] | None = None) -> None:
        """The coordinator, then S x R nodes, one at a time (each joins through the coordinator,
        which spreads them over the stages). `overrides`: per node index, NodeConfig settings."""
        overrides = overrides or {}
        self.launcher.start_coordinator(self.coordinator_config())
        S, R = self.cfg.model.n_stages, self.cfg.replicas
        for i in range(S * R):
            over = dict(overrides.get(i, {}))
            stage = over.pop("stage", i // R if self.cfg.fixed_stages else None)
            self.launcher.start_node(self.node_config(stage, **over), wait=False)
        for p in self.nodes:
            self.launcher.wait_ready(p)
        self.t0 = time.time()
        if self.wan is not None:
            self.wan.arm()

    def stop_all(self, grace_s: float = 60.0) -> None:
        self.launcher.stop_all(grace_s)

    def kill_all(self) -> None:
        self.launcher.kill_all()

    # ---- what the event logs say -----------------------------------------------------------
    def losses(self) -> list[float]:
        """The swarm's loss per step (every last-stage replica logs the same averaged one)."""
        last = self.cfg.model.n_stages - 1
        by_step: dict[int, float] = {}
        for p in self.nodes:
            for e in p.steps():
                if e["stage"] == last and "loss" in e:
                    by_step.setdefault(e["step"], e["loss"])
        return [by_step[s] for s in sorted(by_step)]

    def _bytes(self) -> tuple[int, int, int]:
        fwd = bwd = 0
        for p in self.nodes:
            ev = [e for e in p.steps()] + [
                e for e in _events(p) if e["event"] == "exit" and "bytes_forward" in e
            ]
            if ev:
                fwd += max(e.get("bytes_forward", 0) for e in ev)
                bwd += max(e.get("bytes_backward", 0) for e in ev)
        return fwd, bwd, fwd + bwd

    def _tok_s(self) -> float:
        last = self.cfg.model.n_stages - 1
        times = sorted(e["time"] for p in self.nodes for e in p.steps() if e["stage"] == last)
        n = len(self.losses())
        if not times or not n:
            return 0.0
        return n * self.cfg.tokens_per_step / max(max(times) - self.t0, 1e-9)

    def hardware(self) -> dict[str, Any]:
        """Parameters, the nodes' devices and precision, the largest peak memory of any node
        (device memory on GPUs, process RSS on CPUs), and the swarm's MFU against one device's
        peak (simulate runs every node on this machine, so they share it)."""
        from node.model.presets import flops_per_token, mfu, parameter_count, peak_flops

        ready = [e for p in self.nodes for e in _events(p) if e["event"] == "ready"]
        names = sorted({str(e.get("device", "cpu")) for e in ready}) or ["cpu"]
        peaks = [e.get("peak_memory_bytes", 0) for p in self.nodes for e in p.steps()]
        m = self.cfg.model
        return {
            "parameters": parameter_count(m),
            "device": names[0] if len(names) == 1 else names,
            "precision": self.cfg.precision,
            "peak_memory_bytes": max(peaks, default=None),
            "mfu": mfu(flops_per_token(m), self._tok_s(), peak_flops(names[0], self.cfg.precision))
            if len(names) == 1
            else None,
        }

    def accounting(self) -> dict[str, Any]:
        """Per stage and step, from every node's step events: microbatch ids covered by the
        update that was applied (lost = the step's ids that were not), recomputations."""
        M, S = self.cfg.microbatches, self.cfg.model.n_stages
        covered: dict[tuple[int, int], set[int]] = defaultdict(set)
        recomputed = unrecoverable = 0
        round_s: list[float] = []
        for p in self.nodes:
            for e in p.steps():
                covered[(e["stage"], e["step"])] |= set(e.get("round_ids", []))
                recomputed += e.get("recomputed", 0)
                if e.get("group", 1) > 1:
                    round_s.append(e.get("round_s", 0.0))
            for e in _events(p):
                if e["event"] == "exit":
                    unrecoverable += e.get("stats", {}).get("lost", 0)
        steps = len(self.losses())
        lost = sum(M - len(covered.get((k, t), set())) for k in range(S) for t in range(steps))
        return {
            "microbatches_recomputed": recomputed,
            "microbatches_lost": lost + unrecoverable,
            "averaging_s_per_round": sum(round_s) / len(round_s) if round_s else 0.0,
        }

    # ---- the run ---------------------------------------------------------------------------
    def run(self, progress: bool = True, overrides: dict[int, dict] | None = None) -> dict:
        """Launch, watch and reap the swarm. Ctrl-C (KeyboardInterrupt) is a stop, not a
        failure: every node drains (finishes its step, checkpoints it) and the result says
        `stopped`; a second Ctrl-C during the drain kills what is left."""
        stopped = False
        try:
            self.launch(overrides)
            ok, error = self.supervise(progress)
        except RuntimeError as err:
            ok, error = False, str(err) or type(err).__name__
        except KeyboardInterrupt:
            ok, error, stopped = False, None, True
            print(
                "stopping: every node finishes its step... (Ctrl-C again to kill)",
                file=sys.stderr,
                flush=True,
            )
        finally:
            try:
                self.stop_all()
            except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                stopped, self.killed_on_stop = True, True
                self.kill_all()
            finally:
                if self.wan is not None:
                    self.wan.close()
        return self.result(ok, error, stopped=stopped)

    def supervise(self, progress: bool = False, timeout_s: float | None = None):
        """Watch the run to its end (every node exited), with a progress bar and, with
        --chaos, the kills. Returns (ok, error)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, disable=not progress, unit="step", desc="simulate")
        chaos = Chaos(self) if cfg.chaos else None
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        try:  # closed on Ctrl-C too: the stop message starts on a line of its own
            error = self._watch(bar, chaos, deadline, timeout_s)
        finally:
            bar.close()
        if error is None and len(self.losses()) != cfg.steps:
            error = f"{len(self.losses())} of {cfg.steps} steps done"
        return error is None, error

    def _watch(self, bar, chaos: Chaos | None, deadline: float, timeout_s: float | None):
        """supervise's loop; returns the error that ended it, or None."""
        cfg, error, finished_at = self.cfg, None, None
        while any(p.alive for p in self.nodes) or (chaos and chaos.pending):
            losses = self.losses()
            if len(losses) >= cfg.steps:  # done: give stragglers (late joiners) a moment
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 10:
                    break
            if len(losses) > bar.n:
                bar.update(len(losses) - bar.n)
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}",
                    tok_s=f"{self._tok_s():.0f}",
                    nodes=sum(p.alive for p in self.nodes),
                )
            failed = [p for p in self.nodes if not p.died and p.proc.poll() not in (None, 0)]
            if failed:
                error = "; ".join(f"{p.name} exit {p.proc.poll()}" for p in failed)
                break
            if time.monotonic() > deadline:
                error = f"not done after {timeout_s:.0f}s"
                break
            if chaos is not None:
                if len(losses) < cfg.steps - 2:
                    chaos.tick()
                else:
                    chaos.pending.clear()  # too late for a replacement to catch up
            time.sleep(0.2)
        return error

    def result(self, ok: bool, error: str | None, stopped: bool = False) -> dict[str, Any]:
        """`stopped`: ended by Ctrl-C (not ok, no error: the nodes drained and checkpointed)."""
        cfg, S = self.cfg, self.cfg.model.n_stages
        losses = self.losses()
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
            try:
                val = final_val_loss(self.ckpt, cfg)
            except KeyboardInterrupt:  # Ctrl-C after the last step: the run itself is whole
                stopped = True
        return {
            "ok": ok,
            "error": error,
            "stopped": stopped,
            "killed_on_stop": self.killed_on_stop,
            "workdir": str(self.workdir),
            "has_checkpoint": has_checkpoint(self.ckpt, S),
            "steps": len(losses),
            "train_loss": losses[-1] if losses else None,
            "val_loss": val,
            "loss_history": losses,
            "tokens": len(losses) * cfg.tokens_per_step,
            "tokens_per_s": self._tok_s(),
            "wire_bytes_forward": fwd,
            "wire_bytes_backward": bwd,
            "wire_bytes_per_step": total / max(1, len(losses)),
            "wire_compression_vs_bf16": base / total if total else None,
            "wire_codec": cfg.wire_codec.value,
            "stages": S,
            "replicas": cfg.replicas,
            "d_model": cfg.model.d_model,
            "boundary_dim": cfg.model.boundary_dim,
            "compression": cfg.model.compression,
            **self.hardware(),
            **self.accounting(),
            "nodes_killed": sum(p.died for p in self.nodes),
            "rejoins": self.rejoins,
            "nodes": [
                {
                    "name": p.name,
                    "stage": p.stage,
                    "pid": p.proc.pid,
                    "exit_code": p.proc.poll(),
                    "killed": p.died,
                    "log": str(p.log),
                }
                for p in self.nodes
            ],
            "checkpoint_dir": str(self.ckpt),
            "link": self.wan.stats() if self.wan else None,
        }


class Chaos:
    """Seeded kills: at random times, SIGKILL a random node of a stage that has another live
    replica, and start a replacement a little later (it joins and syncs)."""

    def __init__(self, swarm: Swarm):
        self.swarm, self.cfg = swarm, swarm.cfg
        self.rng = random.Random(swarm.cfg.chaos_seed)
        self.next_kill = time.monotonic() + self._gap()
        self.pending: list[tuple[float, int]] = []  # (when, stage) replacements to start

    def _gap(self) -> float:
        return self.rng.expovariate(1.0 / self.cfg.chaos_interval_s) + 2.0

    def tick(self) -> None:
        now = time.monotonic()
        for when, stage in list(self.pending):
            if now >= when:
                self.pending.remove((when, stage))
                self.swarm.launcher.start_node(self.swarm.node_config(stage), wait=False)
                self.swarm.rejoins += 1
        if now < self.next_kill:
            return
        self.next_kill = now + self._gap()
        live: dict[int, list[Proc]] = defaultdict(list)
        for p in self.swarm.nodes:
            if p.alive and p.ready and p.stage is not None and _synced(p):
                live[p.stage].append(p)
        candidates = sorted(
            (p for ps in live.values() if len(ps) >= 2 for p in ps), key=lambda p: p.name
        )
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        self.swarm.launcher.kill(victim)
        self.pending.append((now + self.cfg.chaos_restart_s, victim.stage))


def _synced(p: Proc) -> bool:
    """Has it done a step (so it is in sync, not still joining)?"""
    return bool(p.steps())


def _events(p: Proc) -> list[dict[str, Any]]:
    from node.events import read_events

    return read_events(p.events)


def has_checkpoint(ckpt: Path, n_stages: int) -> bool:
    """Is there a file for every stage (what `resbm sample` and `resbm export` load)?"""
    from node.checkpoint import STAGE_FILE

    return all((Path(ckpt) / STAGE_FILE.format(k=k)).is_file() for k in range(n_stages))


def final_val_loss(ckpt: Path, cfg: TrainConfig) -> float:
    from node import device as devices
    from node.checkpoint import load_model
    from node.data import Batches, Corpus
    from node.trainer import evaluate

    model, _ = load_model(ckpt)
    dev = devices.resolve(cfg.device)
    devices.configure(dev)
    model.to(dev)
    batches = Batches(Corpus.load(cfg.data), cfg.model.seq_len, cfg.batch_size, cfg.seed)
    return evaluate(model, batches, cfg.eval_batches, cfg.precision)


def print_summary(r: dict[str, Any], out) -> None:
    if r.get("stopped"):
        status = (
            "stopped (Ctrl-C twice): nodes killed; the checkpoints may be older"
            if r.get("killed_on_stop")
            else "stopped (Ctrl-C): every node drained and checkpointed"
        )
    else:
        status = "ok" if r["ok"] else f"FAILED: {r['error']}"
    rows = [
        ("status", status),
        ("stages x replicas", f"{r['stages']} x {r['replicas']} ({len(r['nodes'])} nodes run)"),
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
    rows += [
        ("link", _link_row(r["link"])),
        ("nodes killed / rejoins", f"{r['nodes_killed']} / {r['rejoins']}"),
        ("microbatches recomputed", r["microbatches_recomputed"]),
        ("microbatches lost", r["microbatches_lost"]),
    ]
    if r["replicas"] > 1:  # one replica a stage has no one to average with
        rows.append(("averaging per round", f"{r['averaging_s_per_round']:.3f} s"))
    ckpt = r["checkpoint_dir"]
    rows += [
        ("logs", r.get("workdir", "-")),
        ("checkpoints", ckpt if r.get("has_checkpoint") else f"{ckpt} (none written)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    if not r["ok"] and not r.get("stopped"):
        for n in r["nodes"]:
            print(f"--- {n['name']} (stage {n['stage']}) log ({n['log']}):", file=out)
            print(tail(Path(n["log"])), file=out)
    if r.get("stopped"):
        where = f"checkpoints in {ckpt}" if r.get("has_checkpoint") else "no checkpoint written"
        print(f"stopped at step {r['steps']}; {where}", file=out)
    if r.get("has_checkpoint"):
        print(f"sample from it:  {sample_command(ckpt)}", file=out)
    out.flush()


def sample_command(ckpt: str | Path) -> str:
    """The line a user pastes to see what the run learned."""
    return f"resbm sample --checkpoint-dir {shlex.quote(str(ckpt))} --prompt 'ROMEO:'"


def _link_row(link: dict[str, Any] | None) -> str:
    if not link:
        return "loopback (no emulation)"
    b = link["bytes"]
    return (
        f"{link['link']} each way: {link['connections']} connections, {link['severed']} severed, "
        f"{b['up']:,} B dialer->node / {b['down']:,} B node->dialer"
    )
