"""Process plumbing for `resbm node`: start-up order, signals, parent death, the event loop.

Start-up order in every process: anything that forks (hivemind's DHT, from issue #4) first, then
torch compute and gRPC objects, all created inside the running uvloop loop: gRPC is not fork-safe
and a child forked after multithreaded torch work can hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys

import uvloop

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when our parent dies (Linux), so no node outlives its
    launcher; launchers also kill whole process groups."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # it died before prctl took effect: no signal will come
            os.kill(os.getpid(), sig)


def setup_logging(level: str = "INFO", prefix: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def dump_tasks() -> None:
    """SIGUSR1: log what every task is waiting on (for a node that seems stuck)."""
    for task in asyncio.all_tasks():
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 20:  # follow what each coroutine awaits
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        logging.getLogger("node.tasks").warning(
            "task %s: %s", task.get_name(), " -> ".join(chain) or "-"
        )


def run_node(cfg) -> int:
    """Run one stage node until the run ends or a signal stops it; returns the exit code."""
    die_with_parent()
    setup_logging(prefix=f"[stage {cfg.stage}] ")

    async def amain() -> int:
        from node.daemon import StageNode  # torch + grpc: only after anything that forks

        node = StageNode(cfg)
        loop = asyncio.get_running_loop()
        stops = []

        def on_stop_signal() -> None:
            # first signal: a clean stop; if that hangs (or on a second signal) exit anyway, so
            # a node told to go (by a user, or by its dying launcher) always goes
            stops.append(1)
            if len(stops) > 1:
                os._exit(1)
            node.request_stop()
            loop.call_later(STOP_GRACE_S, os._exit, 1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop_signal)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        return await node.run()

    return uvloop.run(amain())
