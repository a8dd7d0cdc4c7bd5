"""Process lifetime for the long-running processes (node, coordinator, their helpers): die with
the parent, exit taking the process group along, and say where the process is (every task's
awaits, every thread) when asked (SIGUSR1) or stuck."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

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


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
HEAP_ARENAS = 2
HEAP_MMAP_BYTES = 128 << 10


def bound_heap() -> None:
    """Keep freed memory from piling up in glibc's heap (Linux): at most HEAP_ARENAS malloc
    arenas, and a fixed mmap threshold, so a freed big buffer (a tensor off the wire, a gRPC
    message) goes back to the kernel at once. glibc's defaults (an arena per thread, up to 8 a
    core; a threshold that rises to 32 MiB once big buffers are freed) let a node's memory
    creep up under a flood of messages it refuses (`resbm bench flood`, #10 H5). Call it
    first thing in a process; forked children (hivemind's) inherit it. A MALLOC_* setting in
    the environment wins."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        return
    for env, param, value in (
        ("MALLOC_ARENA_MAX", M_ARENA_MAX, HEAP_ARENAS),
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, HEAP_MMAP_BYTES),
        ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, HEAP_MMAP_BYTES),
    ):
        if env not in os.environ and not mallopt(param, value):
            logging.getLogger(__name__).debug("mallopt(%d, %d) refused", param, value)


def where() -> str:
    """What every task awaits (each coroutine's chain of awaits) and every thread's stack."""
    lines = []
    for task in asyncio.all_tasks():
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 20:  # follow what each coroutine awaits
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"task {task.get_name()}: {' -> '.join(chain) or '-'}")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame, limit=12))
        lines.append(f"thread {names.get(ident, ident)}:\n{stack}")
    return "\n".join(lines)


def dump_tasks() -> None:
    """SIGUSR1: log what every task is waiting on, and every thread (a node that seems stuck)."""
    logging.getLogger("node.tasks").warning("where the process is:\n%s", where())


async def report_if_stuck(
    turned_at: Callable[[], float | None],
    after_s: float,
    log: logging.Logger,
    what: str,
    checks: int | None = None,
) -> int:
    """Every `after_s` until cancelled (or `checks` times): if the loop has not turned in that
    time (`turned_at()`: when it last did, None before it started), log `what` and where the
    process is, once a stall. A node whose loop stops turning says nothing otherwise: its
    event loop still runs (a signal handler logs the stop), but the coroutine that drives the
    machine waits on something that does not come back. A run of the test suite saw that
    once, at a run's end (a middle stage handled none of its neighbours' link-downs after its
    last step), and it could not be reproduced. Returns how many stalls it logged."""
    logged, said, n = 0, object(), 0
    while checks is None or n < checks:
        await asyncio.sleep(after_s)
        n += 1
        last = turned_at()
        if (last is not None and time.monotonic() - last < after_s) or last == said:
            continue
        said, logged = last, logged + 1
        since = (
            "has not started"
            if last is None
            else f"has not turned for {time.monotonic() - last:.0f} s"
        )
        log.warning(
            "%s, and the loop %s (a long state download or round, or a hang); where it is:\n%s",
            what, since, where(),
        )  # fmt: skip
    return logged
