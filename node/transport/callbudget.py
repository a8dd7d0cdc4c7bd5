"""A budget of unary calls per caller host, checked before the request is read (#10 H5, M4).

gRPC reads a unary request whole before any handler runs, and what a stream of requests costs a
server is memory inside gRPC's core, growing with their size, refused or not (a scratch
measurement, not a project benchmark: `resbm bench flood` shows the whole node). A handler's own
refusal comes too late. This interceptor serves every unary method as a client-streaming one:
the server reads nothing until the guard asks for the one request, and a caller over its budget
is refused with RESOURCE_EXHAUSTED first (its request stays in the transport's flow-control
window, at most 64 KiB, and is dropped with the call). The bytes requests carry are budgeted the
same way: charged once read, and a host in debt is refused before anything more of it is read
(reads of big pings within the call budget still grew a server steadily). In a private swarm,
calls without the swarm's token (from its metadata, before anything is read) have budgets of
their own: a stranger behind the same address as a member (one NAT) cannot use up the member's;
such a call is refused here, unread (the health service, which needs no token, excepted). A
request is read within READ_S, and a host has at most MAX_IN_FLIGHT calls in progress (strangers
all together MAX_IN_FLIGHT_STRANGERS, other machines' MAX_IN_FLIGHT_ALL, below the server's
`max_rpcs`: links need some): a caller that sent headers and never a request held its call, and
one of the server's `max_rpcs`, for ever (a review: eight such calls locked out every member of
a server of eight). Streams (Stage/Link) are left alone: links are capped by count, and a link
is read only as fast as the node takes its messages (node/peering.py)."""

from __future__ import annotations

import asyncio
import ipaddress

import grpc

from node.transport.diagnostics import RateLimiter, caller_host
from node.transport.security import HEALTH_PREFIX, TokenInterceptor

BYTES_UNKNOWN = 256 << 10  # what a request that did not parse is charged (at least what it was)
READ_S = 10.0  # for a request (at most 128 KiB) to come, once asked for
MAX_IN_FLIGHT = 32  # calls in progress per caller host (`resbm doctor` has 8 pings in flight)
MAX_IN_FLIGHT_STRANGERS = 64  # calls without the token in progress, all hosts together
MAX_IN_FLIGHT_ALL = 128  # unary calls in progress from other machines (max_rpcs: 512, 256)


def host_key(host: str) -> str:
    """Whom a budget is kept for: the IPv4 address, or the IPv6 /64 (one subscriber's network:
    an address each cost nothing to an attacker with one)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.is_loopback:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("/")[0]).is_loopback
    except ValueError:
        return False


class CallBudget(grpc.aio.ServerInterceptor):
    """Calls and request bytes per caller host (and all hosts together). A call is read only if
    its host has calls left and has paid for the bytes it sent before: the bytes of a request
    are known once read, so they are charged after, as a debt the next calls wait on."""

    def __init__(
        self, per_host_s: float = 50.0, burst: float = 300.0, all_s: float = 500.0,
        all_burst: float = 3000.0, bytes_per_s: float = float(1 << 20),
        bytes_burst: float = float(16 << 20), token: str | None = None,
    ):  # fmt: skip
        # the token's check on a call's metadata (None: an open swarm, one budget for all)
        self._unproven = TokenInterceptor(token).problem if token else None
        self._in_flight: dict[str, int] = {}
        self.per_host_s = per_host_s
        self._host = RateLimiter(per_host_s, burst)  # doctor's 2 MiB each way: ~45 calls
        self._all = RateLimiter(all_s, all_burst)  # many hosts together (#10 M4)
        self._bytes = RateLimiter(bytes_per_s, bytes_burst)
        self._all_bytes = RateLimiter(4 * bytes_per_s, 4 * bytes_burst)
        self.refused = 0

    def _admit(self, host: str, everyone: str = "*") -> bool:
        """Within its host's budget and, unless it is this machine (a container's health
        check, a local swarm), within all hosts' (else a few hosts locked out everyone's
        health checks and doctor: a review). `host` and `everyone` are a stranger's own
        buckets for a call without the token."""
        if not (self._bytes.in_credit(host) and self._host.allow(host)):
            return False
        if _local(host.rsplit(" ", 1)[-1]):  # a stranger's bucket names its host last
            return True
        return self._all_bytes.in_credit(everyone) and self._all.allow(everyone)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, handler_call_details.method
        why = self._unproven and self._unproven(handler_call_details.invocation_metadata)
        everyone = "stranger *" if why else "*"
        refuse = why and not method.startswith(HEALTH_PREFIX)  # health needs no token

        async def guarded(requests, context):
            host = host_key(caller_host(context))
            local = _local(host)
            host = f"stranger {host}" if why else host
            if not self._admit(host, everyone):
                self.refused += 1
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method}: over this server's budget of calls (about {self.per_host_s:g} "
                    "a second and 1 MiB a second a host): retry later",
                )
            if refuse:  # the token check's answer, before anything of the request is read
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            # calls in progress: per host and, but for this machine's (a container's health
            # probe holds no token), all remote callers' and strangers' together, below the
            # server's max_rpcs (links are calls too)
            caps = {host: MAX_IN_FLIGHT}
            if not local:
                caps["in flight"] = MAX_IN_FLIGHT_ALL
                if why:
                    caps[everyone] = MAX_IN_FLIGHT_STRANGERS
            if any(self._in_flight.get(key, 0) >= cap for key, cap in caps.items()):
                self.refused += 1
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method}: too many calls in progress from this host: retry later",
                )
            for key in caps:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            try:
                return await self._serve(requests, context, inner, method, host, everyone)
            finally:
                for key in caps:
                    if (left := self._in_flight.get(key, 1) - 1) > 0:
                        self._in_flight[key] = left
                    else:
                        self._in_flight.pop(key, None)

        return grpc.stream_unary_rpc_method_handler(
            guarded, handler.request_deserializer, handler.response_serializer
        )

    async def _serve(self, requests, context, inner, method: str, host: str, everyone: str):
        """Read the one request (within READ_S), charge its bytes, run the handler."""
        try:
            request = await asyncio.wait_for(requests.__anext__(), READ_S)
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: no request")
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: no request in {READ_S:g}s"
            )
        if hasattr(request, "ByteSize"):
            size = request.ByteSize()
        elif isinstance(request, bytes | bytearray):  # undecoded
            size = len(request)
        else:
            size = BYTES_UNKNOWN
        self._bytes.spend(host, size)
        self._all_bytes.spend(everyone, size)
        return await inner(request, context)
