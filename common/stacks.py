"""Where a process is, for a log: every thread's stack and every asyncio task's await.

A node whose loop stops turning says nothing: its event loop still runs (a signal handler logs
the stop), but the coroutine that drives the machine waits on something that never comes back.
A run of the test suite saw that once, at a run's end (a middle stage never handled its
neighbours' link-downs after its last step), and it could not be reproduced; `report_if_stuck`
puts what it waited on in the log the next time.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable


def stacks() -> str:
    """Every thread's stack, then every task's (what each coroutine awaits)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}")
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop in this thread
        tasks = set()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        buf = io.StringIO()
        task.print_stack(file=buf)
        out.append(buf.getvalue())
    return "\n".join(out)


async def report_if_stuck(
    turned_at: Callable[[], float], since: float, after_s: float, log: logging.Logger, what: str
) -> bool:
    """After `after_s`, if the loop has not turned since `since` (`turned_at()`: when it last
    did), log `what` and where every thread and task is. Returns whether it did."""
    await asyncio.sleep(after_s)
    last = turned_at()
    if last >= since:
        return False
    log.warning(
        "%s, and the loop has not turned for %.0f s (a long state download or round, or a "
        "hang); where it is:\n%s",
        what, time.monotonic() - last, stacks(),
    )  # fmt: skip
    return True
