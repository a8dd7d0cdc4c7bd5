"""The node's and coordinator's heap settings (common.process.bound_heap, #10 H5): freed big
buffers go back to the kernel. With glibc's defaults, once one big buffer was freed the mmap
threshold rose, later big buffers came from the heap, and freed ones between small live
allocations stayed resident: a node refusing a flood of messages crept up in memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from common.process import bound_heap
    if sys.argv[1] == "bound":
        bound_heap()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    libc.free(libc.malloc(8 << 20))  # one big buffer freed: glibc's threshold rises to it
    bigs, smalls = [], []
    for _ in range(64):  # big buffers (messages, tensors) between smaller live ones
        b = libc.malloc(1 << 20)
        ctypes.memset(b, 1, 1 << 20)
        bigs.append(b)
        smalls.append(libc.malloc(100 << 10))  # from the heap, after it: pins it
    before = rss_mb()
    for b in bigs:
        libc.free(b)
    print(before - rss_mb())
    """
)


def _released_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_big_buffers_go_back_to_the_kernel():
    assert _released_mb("bound") > 48  # of 64 MiB freed
    assert _released_mb("default") < 16  # what glibc's defaults kept (the check can fail)
