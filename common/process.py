"""Process lifetime for the long-running processes (node, coordinator, their helpers): die with
the parent, exit taking the process group along, and dump what every task awaits."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0


def hard_exit(code: int = 1) -> None:
    """Exit now, taking our children (hivemind's DHT and averager processes, p2pd) along when
    we lead our process group (as launchers start us); os._exit alone would orphan them."""
    with contextlib.suppress(OSError):
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    os._exit(code)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when our parent dies (Linux), so no node outlives its
    launcher; launchers also kill whole process groups."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # it died before prctl took effect: no signal will come
            os.kill(os.getpid(), sig)


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
