"""The reaper: when a process that started hivemind children dies, however it dies, its children
die too.

hivemind forks a DHT process (which starts `p2pd`) and an averager process. If the main process
is SIGKILLed (an OOM kill, `kill -9`, a crash in native code) nobody stops them: they are
reparented to init and live on, holding ~600 MB and, worse, answering in the DHT as a replica
that no longer trains (a restarted node then tries to download its state from that ghost). The
kernel's parent-death signal cannot cover them all (p2pd is a grandchild started by hivemind),
and killing the process group is only safe when the process leads its own group, which a node
started from a shell or under another supervisor may not.

So `start_reaper()` starts a small watcher process (`python -m common.reaper PID`) before the
first hivemind fork. It keeps a list of PID's descendants, refreshed every `INTERVAL_S`, waits for
PID to exit (a pidfd, so it wakes at once), then SIGKILLs every process on the list that is still
the same process (same start time: a recycled pid is left alone), and, when PID led its process
group or session, whatever is left in it, then exits. It ignores the
terminal's and the launcher's signals, so it outlives the process it watches by design; it never
outlives it by more than a moment.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

INTERVAL_S = 0.5
ENV = "RESBM_REAPER_FOR"  # the pid a reaper already watches (a re-executed node keeps it)


def _fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after "pid (comm) " (the name may hold spaces): state, ppid, pgrp,
    session, ..., start time at [19]; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None if it is gone."""
    fields = _fields(pid)
    return None if fields is None else (int(fields[1]), int(fields[19]))


def _grouped_with(leader: int) -> dict[int, int]:
    """Live processes in the process group or session that `leader` led: pid -> start time."""
    found = {}
    for entry in os.scandir("/proc"):
        f = _fields(int(entry.name)) if entry.name.isdigit() else None
        if f is not None and leader in (int(f[2]), int(f[3])) and f[0] != b"Z":
            found[int(entry.name)] = int(f[19])
    return found


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of `root`: pid -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            started[int(entry.name)] = st[1]
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found and pid in started:
            found[pid] = started[pid]
            todo += children.get(pid, [])
    return found


def reap(watched: int, interval_s: float = INTERVAL_S) -> int:
    """Watch `watched` until it exits, then kill what it left behind; returns how many."""
    me = os.getpid()
    known: dict[int, int] = {}
    f = _fields(watched)
    lead = f is not None and watched in (int(f[2]), int(f[3]))
    try:
        fd = os.pidfd_open(watched)
    except (AttributeError, OSError):  # an old kernel: poll for the pid instead
        fd = None
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLIN)
    while True:
        known.update({p: t for p, t in descendants(watched).items() if p != me})
        if fd is not None:
            if poller.poll(interval_s * 1000):
                break
        else:
            if _stat(watched) is None:
                break
            time.sleep(interval_s)
    # a child forked since the last look is not on the list; when the watched process led its
    # process group or session (a shell job, a launcher's node, systemd, docker), its members
    # that are left can only be what it left behind
    if lead:
        known.update({p: t for p, t in _grouped_with(watched).items() if p != me})
    killed = 0
    for pid, started in known.items():
        st = _stat(pid)
        if st is not None and st[1] == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def start_reaper() -> None:
    """Start this process's reaper (Linux; once per pid, across re-executions)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV) == str(os.getpid()):
        return
    subprocess.Popen(
        [sys.executable, "-m", "common.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        close_fds=True,
    )
    os.environ[ENV] = str(os.getpid())


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C or a launcher's stop goes to what we watch
    reap(int(sys.argv[1]))


if __name__ == "__main__":
    main()
