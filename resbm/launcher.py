"""Processes of a local swarm: a coordinator and `resbm node` daemons, each a real process in its
own process group (nodes fork hivemind children: killing the group kills them too), each handed
its exact resolved config as a JSON file. Used by `resbm simulate`, its chaos mode, and the tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.events import read_events


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    events: Path
    log: Path
    ready: dict[str, Any] = field(default_factory=dict)
    killed: bool = False  # by us (chaos, tests)
    doomed: bool = False  # fault injection: it kills itself mid-run

    @property
    def died(self) -> bool:
        """Killed on purpose (by us, or by its own fault injection) rather than failed."""
        code = self.proc.poll()
        # a doomed node dies by its own SIGKILL, or exits 1 when banned for injected garbage
        return self.killed or (self.doomed and code is not None and code != 0)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def stage(self) -> int | None:
        return self.ready.get("stage")

    def steps(self) -> list[dict[str, Any]]:
        return [e for e in read_events(self.events) if e["event"] == "step"]


def _ready_address(p: Proc) -> tuple[str, int] | None:
    """Where a node really listens, once its ready event says (read from the WAN thread, and
    kept: a node's events file only grows)."""
    if not p.ready:
        ready = next((e for e in read_events(p.events) if e["event"] == "ready"), None)
        if ready is None:
            return None
        p.ready = ready
    port = p.ready.get("port")
    return ("127.0.0.1", port) if port else None


def tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


class Launcher:
    def __init__(self, workdir: Path, startup_timeout_s: float = 120.0, wan=None):
        """`wan`: a resbm.wan.WanEmulator: each node then announces a proxy port in front of
        its own, so every inter-stage connection crosses the emulated link."""
        self.workdir, self.startup_timeout_s, self.wan = workdir, startup_timeout_s, wan
        self.coordinator: Proc | None = None
        self.nodes: list[Proc] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def _spawn(
        self, name: str, command: str, config_json: str | None, events: Path, flags=()
    ) -> Proc:
        argv = [sys.executable, "-m", "resbm.cli", command, *flags]
        if config_json is not None:
            config = self.workdir / f"{name}.json"
            config.write_text(config_json)
            argv += ["--config", str(config)]
        log = self.workdir / f"{name}.log"
        events.unlink(missing_ok=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group
            )
        return Proc(name, proc, events, log)

    def wait_ready(self, p: Proc) -> dict[str, Any]:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            for e in read_events(p.events):
                if e["event"] == "ready":
                    p.ready = e
                    return e
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited during start-up:\n{tail(p.log)}")
            time.sleep(0.1)
        raise RuntimeError(f"{p.name} not ready after {self.startup_timeout_s}s:\n{tail(p.log)}")

    # ---- the coordinator -----------------------------------------------------------------
    def start_coordinator(self, cfg) -> Proc:
        """`cfg`: a CoordinatorConfig. Waits until it serves."""
        name = "coordinator"
        events = self.workdir / f"{name}.jsonl"
        cfg = cfg.model_copy(update={"events": events})
        self.coordinator = self._spawn(name, "coordinator", cfg.model_dump_json(indent=1), events)
        self.wait_ready(self.coordinator)
        return self.coordinator

    @property
    def coordinator_address(self) -> str | None:
        c = self.coordinator
        return f"127.0.0.1:{c.ready['port']}" if c and c.alive and c.ready else None

    def initial_peers(self) -> list[str]:
        """DHT addresses of every live process: a new node needs any one of them."""
        peers: list[str] = []
        for p in ([self.coordinator] if self.coordinator else []) + self.nodes:
            if p.alive and p.ready:
                peers += p.ready.get("dht_maddrs") or p.ready.get("maddrs") or []
        return peers[:8]

    # ---- nodes ---------------------------------------------------------------------------
    def start_node(self, cfg, wait: bool = True) -> Proc:
        """`cfg`: a NodeConfig (its events path is set here). A node joins through the
        coordinator when one is up, else through the DHT alone (with its given stage)."""
        name = f"node{len(self.nodes)}"
        events = self.workdir / f"{name}.jsonl"
        # a key file per launched node: a restart given the same file is the same node
        key = cfg.identity_file or self.workdir / f"{name}.key"
        update: dict[str, Any] = {"events": events, "identity_file": key}
        if cfg.swarm:
            update["initial_peers"] = cfg.initial_peers or self.initial_peers()
            if self.coordinator_address and cfg.coordinator is None:
                update["coordinator"] = self.coordinator_address
        holder: list[Proc] = []
        if self.wan is not None:
            front = self.wan.add(name, lambda: _ready_address(holder[0]) if holder else None)
            update["announce"] = f"127.0.0.1:{front}"
        cfg = cfg.model_copy(update=update)
        p = self._spawn(name, "node", cfg.model_dump_json(indent=1), events)
        holder.append(p)
        p.doomed = cfg.fail_at_step is not None
        self.nodes.append(p)
        if wait:
            self.wait_ready(p)
        return p

    def start_joiner(self, name: str, flags: list[str]) -> Proc:
        """`resbm join FLAGS` as a user types it (it learns the rest from the swarm)."""
        events = self.workdir / f"{name}.jsonl"
        p = self._spawn(name, "join", None, events, [*flags, "--events", str(events)])
        self.nodes.append(p)
        return p

    def kill(self, p: Proc, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the whole process group (the node and the DHT/averager children it forked).
        Anything else: the main process only; it stops its children itself (a SIGTERM to the
        group would take its DHT away while it drains)."""
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                p.killed = True
                os.killpg(p.proc.pid, sig)
            else:
                os.kill(p.proc.pid, sig)

    def everyone(self) -> list[Proc]:
        return ([self.coordinator] if self.coordinator else []) + self.nodes

    def stop_all(self, grace_s: float = 60.0) -> None:
        """SIGTERM stage 0's nodes (each finishes its step, then leaves: no new step starts),
        then every other node (idle by then: each leaves at once), then the coordinator; then
        SIGKILL whatever is left. Whole process groups: nothing is orphaned."""
        first = [p for p in self.nodes if p.stage in (0, None)]
        for group in (first, self.nodes, self.everyone()):
            for p in group:
                if p.alive:
                    self.kill(p, signal.SIGTERM)
            deadline = time.monotonic() + grace_s / 3
            while time.monotonic() < deadline and any(p.alive for p in group):
                time.sleep(0.1)
        self.kill_all()

    def kill_all(self) -> None:
        for p in self.everyone():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGKILL)
        for p in self.everyone():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=10)
