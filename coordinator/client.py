"""A small client of the coordinator: join, leave, status, and a status table for people.

Errors are two exceptions: `CoordinatorRefused` (`JoinRefused` for a Join) carries the server's
status code and message, e.g. why a node's config cannot join; `CoordinatorUnavailable` means no
answer in time (down, unreachable, restarting): retry later. Its `CoordinatorUnreachable` means
no connection at all, and says why in words (connection refused, name not resolved, timed out)
and what to check: a person who mistyped an address learns it at once, not after a minute of
silence. Retrying later is the caller's policy (`resbm join` exits 75 and its service manager
restarts it), not this client's. Once connected, calls use wait_for_ready, so a connection that
drops mid-call (a coordinator restarting) is waited for, up to the call's timeout.

`join_in_subprocess` runs the Join in a fresh (spawned) process: a node joins before it creates
its DHT and averager, which fork, and a gRPC channel opened in the node's own process before
those forks is unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from typing import Any

import grpc

from coordinator.messages import (
    JoinRequest,
    JoinResult,
    LeaveRequest,
    SwarmStatus,
    join_request_to_pb,
    join_result_from_pb,
    leave_request_to_pb,
    status_from_pb,
)
from node.ops_config import SecurityConfig
from node.swarm.records import HOST_PORT
from node.transport import security as sec
from node.wire._pb import coordinator_pb2 as pb
from node.wire._pb import coordinator_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 << 20)]
# how long a first connection may take: a host that drops packets, or a port whose server never
# speaks gRPC, is "unreachable: timed out" after this, not after the whole call's timeout
CONNECT_S = 5.0
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    # its call budget (node/transport/callbudget.py): busy, not a refusal of this node
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class CoordinatorError(Exception):
    """Base of the coordinator client's errors."""


class CoordinatorUnavailable(CoordinatorError):
    """No answer in time: the coordinator is down, unreachable or restarting. Retry later."""


class CoordinatorUnreachable(CoordinatorUnavailable):
    """No connection to the coordinator: `cause` says why in words (see connect_cause); the
    message adds what to check, and how."""

    def __init__(self, address: str, cause: str):
        super().__init__(
            f"cannot reach the coordinator at {address}: {cause}; is the coordinator running? "
            f"try `resbm doctor --coordinator {address}`"
        )
        self.address, self.cause = address, cause

    def __reduce__(self):  # picklable: it crosses join_in_subprocess's process boundary
        return (type(self), (self.address, self.cause))


# gRPC's words for a failed connection (its status details) -> a person's
_CAUSES = (
    (("connection refused",), "connection refused"),
    (("errors resolving", "domain name not found", "dns resolution"), "name not resolved"),
    (("timed out", "timeout", "deadline exceeded"), "timed out"),
    (("network is unreachable", "no route to host"), "network unreachable"),
)


def connect_cause(details: str) -> str:
    """Why a connection failed, from gRPC's status details: connection refused (nothing listens
    on that port), name not resolved, timed out, network unreachable; else gRPC's last error."""
    low = details.lower()
    for needles, words in _CAUSES:
        if any(n in low for n in needles):
            return words
    return details.rsplit("last error: ", 1)[-1].strip() or "no connection"


async def _connect(channel, address: str, within_s: float) -> bool:
    """Wait up to `within_s` for the channel to connect. True: connected. False: gRPC already
    gave up on this attempt (refused, unresolvable): a call made now fails at once, and its
    status details say why. Still connecting after `within_s`: CoordinatorUnreachable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return False
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise CoordinatorUnreachable(address, f"timed out (no connection in {within_s:g} s)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        state = channel.get_state(try_to_connect=True)
    return True


class CoordinatorRefused(CoordinatorError):
    """The coordinator answered with an error; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    def __reduce__(self):  # picklable: it crosses join_in_subprocess's process boundary
        return (type(self), (self.code, self.message))


class JoinRefused(CoordinatorRefused):
    """The swarm will not take this node; the message says why (and what to change)."""


async def _unary(
    address: str, method: str, request: Any, timeout_s: float, refused=None, security=None
):
    if not HOST_PORT.match(address):
        raise ValueError(f"coordinator address {address!r} is not HOST:PORT")
    refused = refused or CoordinatorRefused
    async with sec.open_channel(address, CHANNEL_OPTIONS, security) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        connected = await _connect(channel, address, min(timeout_s, CONNECT_S))
        try:
            # not connected: fail at once with gRPC's reason, unless it connects meanwhile
            call = getattr(stub, method)(
                request,
                timeout=timeout_s,
                wait_for_ready=connected,
                metadata=sec.call_metadata(security),
            )
            return await asyncio.wait_for(call, timeout_s + 1.0)  # belt and braces
        except TimeoutError:
            raise CoordinatorUnavailable(
                f"coordinator {address}: no answer to {method} in {timeout_s:g} s"
            ) from None
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
            still_down = channel.get_state() != grpc.ChannelConnectivity.READY
            if code == grpc.StatusCode.UNAVAILABLE and not connected and still_down:
                raise CoordinatorUnreachable(address, connect_cause(details)) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise CoordinatorUnavailable(
                    f"coordinator {address}: no answer to {method} in {timeout_s:g} s"
                ) from None
            if code in _RETRYABLE:
                raise CoordinatorUnavailable(
                    f"coordinator {address}: {method}: {code.name}: {details}"
                ) from None
            raise refused(code.name, details) from None


async def join(
    address: str,
    request: JoinRequest,
    timeout_s: float = 30.0,
    security: SecurityConfig | None = None,
) -> JoinResult:
    """Join the swarm: this node's stage, the swarm's manifest and DHT peers to bootstrap from.
    `security`: TLS and the swarm token of a private swarm (UNAUTHENTICATED -> JoinRefused)."""
    pb_request = join_request_to_pb(request)
    reply = await _unary(address, "Join", pb_request, timeout_s, JoinRefused, security)
    try:
        return join_result_from_pb(reply)
    except ValueError as err:
        raise CoordinatorRefused("INTERNAL", str(err)) from None


async def leave(
    address: str,
    request: LeaveRequest,
    timeout_s: float = 10.0,
    security: SecurityConfig | None = None,
) -> None:
    """Tell the coordinator this node leaves its stage (its DHT record is withdrawn now)."""
    await _unary(address, "Leave", leave_request_to_pb(request), timeout_s, None, security)


async def status(
    address: str, timeout_s: float = 10.0, security: SecurityConfig | None = None
) -> SwarmStatus:
    reply = await _unary(address, "Status", pb.StatusRequest(), timeout_s, None, security)
    try:
        return status_from_pb(reply)
    except ValueError as err:
        raise CoordinatorRefused("INTERNAL", str(err)) from None


def _child(conn, method: str, address: str, request, timeout_s: float, security=None) -> None:
    from common.process import die_with_parent

    die_with_parent()
    try:
        if method == "join":
            answer = asyncio.run(join(address, request, timeout_s, security))
        else:
            answer = asyncio.run(status(address, timeout_s, security))
        result: tuple[str, Any] = ("ok", answer)
    except CoordinatorError as err:
        result = ("error", err)
    except Exception as err:  # e.g. a malformed address: report it, do not hang the parent
        result = ("error", CoordinatorUnavailable(f"{method} failed: {type(err).__name__}: {err}"))
    conn.send(result)
    conn.close()


def _in_subprocess(method, address, request, timeout_s, spawn_s, security):
    """Call the coordinator from a spawned child process: no gRPC object may exist in a node's
    own process before it forks (hivemind's DHT and averager). `spawn_s`: time allowed for the
    child's interpreter to start, on top of `timeout_s`."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child,
        args=(send, method, address, request, timeout_s, security),
        name=f"resbm-{method}",
        daemon=True,
    )
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s + spawn_s):
            raise CoordinatorUnavailable(f"coordinator {address}: no answer to {method} in time")
        kind, payload = recv.recv()
    except EOFError:
        raise CoordinatorUnavailable(
            f"the {method} process died (exit code {proc.exitcode}) before it had an answer"
        ) from None
    finally:
        recv.close()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if kind == "ok":
        return payload
    raise payload


def join_in_subprocess(
    address: str,
    request: JoinRequest,
    timeout_s: float = 30.0,
    spawn_s: float = 60.0,
    security: SecurityConfig | None = None,
) -> JoinResult:
    """`join`, from a spawned child process (see _in_subprocess)."""
    return _in_subprocess("join", address, request, timeout_s, spawn_s, security)


def status_in_subprocess(
    address: str,
    timeout_s: float = 30.0,
    spawn_s: float = 60.0,
    security: SecurityConfig | None = None,
) -> SwarmStatus:
    """`status`, from a spawned child process (see _in_subprocess)."""
    return _in_subprocess("status", address, None, timeout_s, spawn_s, security)


def format_status(st: SwarmStatus) -> str:
    """The status page in the terminal: the swarm, its throughput and loss curve, and per stage
    its replicas with state, throughput and step. Strings from the DHT are untrusted: anything
    unprintable (a terminal escape sequence) is shown as '?'."""
    from coordinator.history import (
        capacity_tokens_per_s,
        finished,
        human,
        measured_tokens_per_s,
        model_summary,
        sparkline,
        stalls,
        utc,
    )

    def clean(text: str, width: int | None = None) -> str:
        text = "".join(c if c.isprintable() else "?" for c in text)
        return text if width is None else text[:width]

    def rate(v: float | None) -> str:
        return "-" if v is None else f"{human(v)} tokens/s"

    loss = "-" if st.recent_loss is None else f"{st.recent_loss:.4f}"
    curve = [v for _, v, _ in st.loss_history]
    lines = [
        f"swarm {clean(st.manifest.swarm)}  resbm {clean(st.manifest.version)}  fingerprint "
        f"{clean(st.manifest.fingerprint)}  {st.n_stages} stages  step {st.current_step}/"
        f"{st.manifest.steps}{' (finished)' if finished(st) else ''}  recent loss {loss}",
        "model  " + "  ".join(f"{k} {clean(v)}" for k, v in model_summary(st)),
        f"throughput  {rate(measured_tokens_per_s(st))} measured, "
        f"{rate(capacity_tokens_per_s(st))} capacity (slowest stage)",
        f"loss curve  {sparkline(curve) or '(no loss yet)'}"
        + (f"  {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else ""),
        f"            {len(curve)} point(s) sampled since {utc(st.history_since)} "
        "(the coordinator's cache)",
        f"{'stage':>5}  {'node':<24} {'state':<9} {'mb/s':>8} {'load':>5} {'step':>7}  address",
    ]
    for k, reps in enumerate(st.stages):
        online = sum(r.throughput for r in reps if r.state == "online")
        if not reps:
            lines.append(f"{k:>5}  (no replicas)")
        for i, r in enumerate(reps):
            lines.append(
                f"{k if i == 0 else '':>5}  {clean(r.node_id, 24):<24} {clean(r.state, 9):<9} "
                f"{r.throughput:>8.2f} {r.load:>5} {r.step:>7}  {clean(r.address)}"
            )
        lines.append(f"{'':>5}  stage {k}: {len(reps)} replica(s), {online:.2f} mb/s online")
    lines += [f"STALLED  {line}" for line in stalls(st)]
    return "\n".join(lines)
