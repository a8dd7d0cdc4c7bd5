"""A coordinator that cannot be reached: `resbm status` and `resbm join` say why at once
(connection refused, name not resolved, timed out) and what to check, instead of waiting out
their whole timeout (10 s, 60 s) and printing DEADLINE_EXCEEDED. A join still exits 75 ("try
later"): its service manager restarts it, and a coordinator that is back by then is joined."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import time

import grpc
import pytest

from coordinator import client
from coordinator.client import CoordinatorUnreachable, connect_cause
from node.errors import EXIT_TEMPFAIL
from resbm.cli import main


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_port():
    """A port that accepts TCP connections (the kernel's backlog) but never speaks gRPC: what a
    firewall that drops packets, or another program on the port, looks like to a client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def hint(address: str) -> str:
    return f"is the coordinator running? try `resbm doctor --coordinator {address}`"


def test_status_of_a_coordinator_that_is_not_running_says_why_at_once(capsys):
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    rc = main(["status", "--coordinator", address])  # --timeout 10 by default
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 1 and took < 3.0, (rc, took, err)
    assert f"cannot reach the coordinator at {address}: connection refused" in err
    assert hint(address) in err and "DEADLINE_EXCEEDED" not in err


def test_a_name_that_does_not_resolve_is_named():
    start = time.monotonic()
    with pytest.raises(CoordinatorUnreachable) as err:
        asyncio.run(client.status("no-such-host.invalid:7100", timeout_s=10))
    assert err.value.cause == "name not resolved" and time.monotonic() - start < 6.0
    assert hint("no-such-host.invalid:7100") in str(err.value)


def test_a_port_that_never_answers_times_out_within_the_connect_window(monkeypatch):
    monkeypatch.setattr(client, "CONNECT_S", 1.0)
    with silent_port() as port:
        start = time.monotonic()
        with pytest.raises(CoordinatorUnreachable) as err:
            asyncio.run(client.status(f"127.0.0.1:{port}", timeout_s=10))
    assert err.value.cause.startswith("timed out") and time.monotonic() - start < 4.0


def test_join_of_a_coordinator_that_is_not_running_exits_75_with_why(tmp_path):
    """As a volunteer runs it: a real `resbm join` process (its Status call in a spawned
    child). Before: 60 s of silence, then DEADLINE_EXCEEDED twice."""
    address = f"127.0.0.1:{closed_port()}"
    argv = [sys.executable, "-m", "resbm.cli", "join", "--coordinator", address]
    argv += ["--state-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - start
    assert out.returncode == EXIT_TEMPFAIL, out.stderr
    assert took < 30.0, took  # interpreter start-ups on a loaded machine; the call itself: ms
    assert f"error: cannot reach the coordinator at {address}: connection refused" in out.stderr
    assert hint(address) in out.stderr and "DEADLINE_EXCEEDED" not in out.stderr


@pytest.mark.parametrize(
    "details, cause",
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
            "connection refused",
        ),
        (
            "errors resolving x.invalid:7100: [field:hostname lookup error:address lookup "
            "failed for x.invalid:7100: Domain name not found]",
            "name not resolved",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: Connection timed out",
            "timed out",
        ),
        ("failed to connect: Network is unreachable", "network unreachable"),
        (
            "failed to connect to all addresses; last error: UNKNOWN: Ssl handshake failed",
            "UNKNOWN: Ssl handshake failed",
        ),
    ],
)
def test_grpc_details_become_a_cause_in_words(details, cause):
    assert connect_cause(details) == cause


def test_an_unreachable_error_crosses_the_join_process_boundary():
    err = pickle.loads(pickle.dumps(CoordinatorUnreachable("h:1", "connection refused")))
    assert isinstance(err, client.CoordinatorUnavailable)  # "try later" for a joiner
    assert err.cause == "connection refused" and hint("h:1") in str(err)


async def test_a_busy_coordinator_is_try_later_not_a_refusal():
    """The coordinator's call budget answers RESOURCE_EXHAUSTED (e.g. a 33rd Join in progress
    from one host, behind one NAT): a joiner is told to try again later (exit 75), not that
    the coordinator refused it (exit 2, a config error)."""
    from coordinator.messages import JoinRequest
    from node.wire._pb import coordinator_pb2_grpc as pb_grpc

    class Busy(pb_grpc.CoordinatorServicer):
        async def Join(self, request, context):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in progress")

    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(Busy(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        request = JoinRequest("n-aaaaaaaaaaaaaaaa", "s", "0", "f", throughput=1.0)
        with pytest.raises(client.CoordinatorUnavailable, match="RESOURCE_EXHAUSTED"):
            await client.join(f"127.0.0.1:{port}", request, timeout_s=10)
    finally:
        await server.stop(0)
