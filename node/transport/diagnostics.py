"""The Diagnostics service (proto/diagnostics.proto) and its client: what `resbm doctor` asks a
peer so a user learns whether their port is reachable from the internet and how fast the path is.

Every node and the coordinator serve it next to their main service (`add_diagnostics`). It is
reachable by anyone who can reach the server (and holds the token, in a private swarm), so every
cost is bounded: a Ping moves at most MAX_PING_BYTES each way and a caller host has a byte budget
per minute; DialBack dials only a syntactically valid HOST:PORT, with a short deadline, a few
times per minute per caller host and a few dozen in all, so the server cannot be used to scan;
and no caller can make it dial into its own private network (`dial_refusal`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass

import grpc

from node.ops_config import check_host_port
from node.transport import security as sec
from node.wire._pb import diagnostics_pb2 as pb
from node.wire._pb import diagnostics_pb2_grpc as pb_grpc

# doctor sends PING_CHUNKs, several at once. What a flood of pings costs a server is memory inside
# gRPC's core, about linear in their size (node/transport/link.py, CHUNK_CAP): small pings
MAX_PING_BYTES = 128 << 10
PING_BURST_BYTES = 16 << 20  # a caller's ping budget at once (doctor moves 2 MiB each way)
PING_WINDOW = 8  # pings doctor keeps in flight to measure bandwidth (hides the round trip)
CHANNEL_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_PING_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_PING_BYTES + (64 << 10)),
]
DIAL_BACK_TIMEOUT_S = 5.0
PING_CHUNK = MAX_PING_BYTES  # bandwidth probes: under every resbm server's limit


class RateLimiter:
    """Token buckets keyed by caller host. The table is bounded: a caller that has been idle long
    enough to refill is forgotten (it is indistinguishable from a new one), and when the table
    is still full, the caller seen least recently is (refusing new callers let anyone with 4096
    addresses lock every `resbm doctor` user out: #10 M4; what all callers together may take is
    bounded by a second limiter, keyed "*")."""

    def __init__(self, per_s: float, burst: float, max_keys: int = 4096, clock=time.monotonic):
        self.per_s, self.burst, self.max_keys, self._clock = per_s, burst, max_keys, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.per_s)

    def spend(self, key: str, cost: float) -> None:
        """Take `cost` whatever is left (the level may go below zero: a debt to pay off)."""
        now = self._clock()
        level = self._level(key, now)
        self._buckets.pop(key, None)
        self._buckets[key] = (level - cost, now)
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def in_credit(self, key: str) -> bool:
        return self._level(key, self._clock()) > 0

    def allow(self, key: str, cost: float = 1.0) -> bool:
        now = self._clock()
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            full = [k for k in self._buckets if self._level(k, now) >= self.burst]
            for k in full:
                del self._buckets[k]
            while len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]  # the least recently seen
        level = self._level(key, now)
        self._buckets.pop(key, None)  # re-inserted last: the dict is in order of last use
        if level < cost:
            self._buckets[key] = (level, now)
            return False
        self._buckets[key] = (level - cost, now)
        return True


def caller_host(context) -> str:
    """The caller's host from grpc's peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")."""
    peer = context.peer() or "unknown"
    _, _, rest = peer.partition(":")
    return (rest or peer).rsplit(":", 1)[0]


def internal(host: str) -> bool:
    """Loopback, private, link-local and other non-public addresses (a name is not one)."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global


def dial_refusal(caller: str, ips: list[str], private: bool = False) -> str | None:
    """Why this server must not dial `ips` for `caller` (None: it may). A public address is
    anyone's to test, and a caller on this machine may test this machine's loopback ports (a
    local swarm). Other private addresses only with `private` (a LAN swarm's servers), and
    then only for a caller on this machine or at that very address. Behind Docker's proxy or
    a NAT every caller looks private, and behind a tunnel every caller looks local: "any
    private target for a private-looking caller" let anyone probe the server's network (#10 M4)."""
    bad = [ip for ip in ips if internal(ip)]
    if not bad:
        return None
    try:
        local = ipaddress.ip_address(caller.strip("[]")).is_loopback
    except ValueError:
        local = False
    if local and all(_loopback(ip) for ip in bad):
        return None
    if private and (local or all(_same(ip, caller) for ip in bad)):
        return None
    return (
        "is in a private network: this server dials back only public addresses (and, for a "
        "caller on its own machine, loopback ones)"
    )


def _loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    return (addr.ipv4_mapped or addr).is_loopback if addr.version == 6 else addr.is_loopback


def _same(a: str, b: str) -> bool:
    try:
        x, y = (ipaddress.ip_address(h.strip("[]")) for h in (a, b))
    except ValueError:
        return False
    x = x.ipv4_mapped or x if x.version == 6 else x
    y = y.ipv4_mapped or y if y.version == 6 else y
    return x == y


async def resolve(host: str, port: int, timeout_s: float) -> list[str]:
    """The IP addresses `host` stands for. DialBack checks these and dials the first one
    itself, so a name that resolves differently a moment later cannot slip past the check."""
    infos = await asyncio.wait_for(
        asyncio.get_running_loop().getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM),
        timeout_s,
    )
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    error: str
    rtt_ms: float


async def probe(address: str, security=None, timeout_s: float = DIAL_BACK_TIMEOUT_S):
    """Open a channel to `address` and Ping it once. Any gRPC answer means the address is
    reachable (a refusal says what answered); no connection or no answer in time means not."""
    start = time.perf_counter()
    channel = sec.open_channel(address, CHANNEL_OPTIONS, security)
    try:
        # never our token: the caller chose this address; an UNAUTHENTICATED answer from a
        # private node proves it reachable all the same
        call = pb_grpc.DiagnosticsStub(channel).Ping(pb.PingRequest(), timeout=timeout_s)
        await asyncio.wait_for(call, timeout_s + 1.0)
        return Reachability(True, "", (time.perf_counter() - start) * 1e3)
    except TimeoutError:
        return Reachability(False, f"no answer from {address} within {timeout_s:g} s", 0.0)
    except grpc.aio.AioRpcError as err:
        rtt = (time.perf_counter() - start) * 1e3
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return Reachability(False, f"cannot connect to {address}: {details}", 0.0)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Reachability(
                False,
                f"no answer from {address} within {timeout_s:g} s (a firewall dropping packets?)",
                0.0,
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            what = "a gRPC server without resbm's Diagnostics service answered (another program?)"
            return Reachability(True, what, rtt)
        return Reachability(True, f"it answered {code.name}: {details}", rtt)
    finally:
        await channel.close()


class DiagnosticsServicer(pb_grpc.DiagnosticsServicer):
    """`security` (a SecurityConfig or None): how DialBack dials, the same way this process's
    peers dial each other (TLS and token)."""

    def __init__(
        self,
        security=None,
        dial_back_timeout_s: float = DIAL_BACK_TIMEOUT_S,
        dial_backs_per_min: float = 6.0,
        ping_bytes_per_s: float = float(1 << 20),
        dial_back_private: bool = False,
    ):
        self._security, self._dial_timeout_s = security, dial_back_timeout_s
        self._private = dial_back_private  # see dial_refusal
        self._dial_per_host = RateLimiter(dial_backs_per_min / 60.0, burst=3)
        self._dial_all = RateLimiter(1.0, burst=20)  # all callers together
        self._ping_bytes = RateLimiter(ping_bytes_per_s, burst=PING_BURST_BYTES)
        # all callers together: many hosts must not turn this node's uplink into theirs (#10 M4)
        self._ping_all = RateLimiter(4 * ping_bytes_per_s, burst=PING_BURST_BYTES)

    async def Ping(self, request, context):
        sent, wanted = len(request.payload), request.reply_bytes
        if sent > MAX_PING_BYTES or wanted > MAX_PING_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a ping carries at most {MAX_PING_BYTES} bytes each way "
                f"(got a {sent}-byte payload asking for {wanted} bytes)",
            )
        cost = sent + wanted + 64
        if not self._ping_bytes.allow(caller_host(context), cost) or not self._ping_all.allow(
            "*", cost
        ):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "ping byte budget spent: retry in a minute"
            )
        return pb.PingReply(payload=bytes(wanted))

    async def DialBack(self, request, context):
        try:
            check_host_port(request.address, allow_zero=False)
        except ValueError as err:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"dial back to what? {err} (give HOST:PORT)"
            )
        if not self._dial_per_host.allow(caller_host(context)) or not self._dial_all.allow("*"):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many dial-back requests: this server runs a few per minute; retry later",
            )
        host, port = request.address.rsplit(":", 1)
        try:
            ips = await resolve(host, int(port), self._dial_timeout_s)
        except (OSError, TimeoutError) as err:
            return pb.DialBackReply(reachable=False, error=f"cannot resolve {host}: {err}")
        refusal = dial_refusal(caller_host(context), ips, self._private)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.address} {refusal}")
        # dial the addresses checked (all at once: "localhost" may be ::1 first), not the name
        targets = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips[:4]]
        tried = await asyncio.gather(
            *(probe(t, self._security, self._dial_timeout_s) for t in targets)
        )
        found = next((r for r in tried if r.reachable), tried[0])
        return pb.DialBackReply(reachable=found.reachable, error=found.error, rtt_ms=found.rtt_ms)


def add_diagnostics(
    server: grpc.aio.Server, security=None, dial_back_private: bool = False
) -> DiagnosticsServicer:
    """Serve Diagnostics on `server` (before it starts)."""
    servicer = DiagnosticsServicer(security, dial_back_private=dial_back_private)
    pb_grpc.add_DiagnosticsServicer_to_server(servicer, server)
    return servicer


async def health_status(address: str, security=None, timeout_s: float = 5.0) -> str:
    """The gRPC health service's answer for the whole server at `address` ("SERVING", ...):
    what a container HEALTHCHECK asks. Raises grpc.aio.AioRpcError or TimeoutError."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with sec.open_channel(address, CHANNEL_OPTIONS, security) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(  # the token: a member's budget
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s,
            metadata=sec.call_metadata(security),
        )  # fmt: skip
        reply = await asyncio.wait_for(call, timeout_s + 1.0)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class DiagnosticsClient:
    """A channel to one server's Diagnostics; every call has a deadline."""

    def __init__(self, address: str, security=None, timeout_s: float = 10.0):
        self.address, self.timeout_s, self._security = address, timeout_s, security
        self._channel = sec.open_channel(address, CHANNEL_OPTIONS, security)
        self._stub = pb_grpc.DiagnosticsStub(self._channel)

    async def __aenter__(self) -> DiagnosticsClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout_s: float | None):
        timeout_s = timeout_s or self.timeout_s
        call = method(request, timeout=timeout_s, metadata=sec.call_metadata(self._security))
        return await asyncio.wait_for(call, timeout_s + 1.0)

    async def ping(
        self, payload_bytes: int = 0, reply_bytes: int = 0, timeout_s: float | None = None
    ) -> float:
        """One Ping; returns its round trip in seconds. Raises grpc.aio.AioRpcError or
        TimeoutError, and ValueError if the reply is not the size asked for."""
        start = time.perf_counter()
        reply = await self._call(
            self._stub.Ping,
            pb.PingRequest(payload=bytes(payload_bytes), reply_bytes=reply_bytes),
            timeout_s,
        )
        elapsed = time.perf_counter() - start
        if len(reply.payload) != reply_bytes:
            raise ValueError(f"asked for {reply_bytes} bytes, got {len(reply.payload)}")
        return elapsed

    async def round_trips(self, n: int) -> list[float]:
        """`n` round trips of a small ping, in seconds, after one that sets the connection up."""
        await self.ping(64, 64)
        return [await self.ping(64, 64) for _ in range(n)]

    async def throughput(self, total: int, up: bool, rtt_s: float) -> float:
        """Bits per second moving `total` bytes one way in PING_CHUNK pings, PING_WINDOW of them
        in flight (as a link keeps its stream full), one round trip `rtt_s` taken out of the
        whole. Each chunk's deadline allows a 256 kbit/s link shared by the window."""
        timeout_s = self.timeout_s + PING_WINDOW * PING_CHUNK * 8 / 256e3
        sizes = [min(PING_CHUNK, total - at) for at in range(0, total, PING_CHUNK)]
        todo = iter(sizes)

        async def worker() -> None:
            for n in todo:
                await self.ping(n if up else 0, 0 if up else n, timeout_s)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(PING_WINDOW, len(sizes)))))
        wall = time.perf_counter() - t0
        return sum(sizes) * 8 / max(wall - rtt_s, wall * 0.1, 1e-9)

    async def dial_back(self, address: str) -> Reachability:
        timeout_s = max(self.timeout_s, DIAL_BACK_TIMEOUT_S + 5.0)
        reply = await self._call(
            self._stub.DialBack, pb.DialBackRequest(address=address), timeout_s
        )
        return Reachability(reply.reachable, reply.error, reply.rtt_ms)
