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
import signal
import sys

import uvloop

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when our parent dies (Linux), so no node outlives its
    launcher; launchers also kill whole process groups."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def setup_logging(level: str = "INFO", prefix: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def run_node(cfg) -> int:
    """Run one stage node until the run ends or a signal stops it; returns the exit code."""
    die_with_parent()
    setup_logging(prefix=f"[stage {cfg.stage}] ")

    async def amain() -> int:
        from node.daemon import StageNode  # torch + grpc: only after anything that forks

        node = StageNode(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        return await node.run()

    return uvloop.run(amain())
