"""A WAN in user space: an asyncio TCP proxy in front of each node's stage port, so that every
inter-stage connection of `resbm simulate --link RATE:LATENCY[:JITTER]` crosses a link with a
given bandwidth and one-way latency in each direction (kernel netem is not available on the
machines we test on, and needs root where it is).

Each direction of each connection is shaped on its own, as a full-duplex link is:

    reader -> token bucket (bandwidth: a chunk leaves once its bytes are paid for)
           -> delay line (latency + jitter, FIFO: TCP never reorders)
           -> writer

The delay line holds what is in flight, up to twice the bandwidth-delay product (at least 1 MiB),
so a long delay never caps the rate (a proxy that slept per chunk before reading the next
would). A schedule can sever every live connection (a reset, as a dropped NAT mapping or a
flapping link gives) and refuse new ones for a while.

Each connection has its own buckets: a node with several neighbours gets RATE per connection, not
RATE shared (a link per pair of nodes, not a home uplink). What it does not shape: the
coordinator, the DHT and the averaging traffic of replicas (hivemind's own connections), which is
control-plane or intra-stage traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# bits a second. `mbps` is megabits a second, as links are sold (not tc's megabytes); any case:
# 10mbit, 10mbps, 10Mbps, 10Mbit/s, 10mb/s all mean 10 Mbit/s. A capital B in a unit
# (10MBps, 10MB/s) reads as bytes and is refused with the bits to write instead.
_RATE_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE_UNITS = {
    p + suffix: scale
    for p, scale in _RATE_PREFIXES.items()
    for suffix in ("bit", "bps", "bit/s", "b/s", "bits", "bits/s")
}
RATE_UNITS_HELP = "bit, kbit, mbit, gbit or bps, kbps, mbps (= mbit), gbps; any case"
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d+)?)"
TARGET_WAIT_S = 30.0  # a connection that arrives before its node is ready waits this long
CONNECT_TIMEOUT_S = 10.0


def _quantity(text: str, units: dict[str, float], what: str, names: str = "") -> float:
    m = re.fullmatch(_NUMBER + r"([a-z/]*)", text.strip().lower())
    if not m or m.group(2) not in units:
        names = names or ", ".join(units)
        raise ValueError(f"{what} {text!r}: expected a number and one of {names}")
    return float(m.group(1)) * units[m.group(2)]


def _rate(text: str) -> float:
    """Bits a second from e.g. 80mbit, 80mbps, 80Mbps, 1.5gbit, 512kbit."""
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z/]*)", text.strip())
    if m and "B" in m.group(2) and m.group(2).lower() in _RATE_UNITS:
        bits = float(m.group(1)) * 8 * _RATE_UNITS[m.group(2).lower()]
        raise ValueError(
            f"rate {text!r}: a capital B is bytes; give bits, e.g. {_bits_text(bits)} "
            f"(units: {RATE_UNITS_HELP})"
        )
    return _quantity(text.replace(" ", ""), _RATE_UNITS, "rate", RATE_UNITS_HELP)


def _bits_text(bps: float) -> str:
    for prefix, scale in (("g", 1e9), ("m", 1e6), ("k", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{prefix}bit"
    return f"{bps:g}bit"


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link, as `--link RATE:LATENCY[:JITTER]` gives it (e.g. 80mbit:40ms:5ms or
    10Mbps:40ms; RATE in bits a second, see _RATE_UNITS)."""

    text: str  # as given: benchmark results name links by it
    rate_bps: float  # bits a second, each direction
    latency_s: float  # one way
    jitter_s: float = 0.0  # one way, uniform in [-jitter, +jitter], never reordering

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        parts = text.strip().split(":")
        if len(parts) == 1:  # a rate alone: no added latency
            parts.append("0ms")
        if len(parts) not in (2, 3):
            raise ValueError(f"--link {text!r}: expected RATE[:LATENCY[:JITTER]], e.g. 80mbit:40ms")
        try:
            rate = _rate(parts[0])
            latency = _quantity(parts[1], _TIME_UNITS, "latency")
            jitter = _quantity(parts[2], _TIME_UNITS, "jitter") if len(parts) == 3 else 0.0
        except ValueError as err:
            raise ValueError(f"--link {text!r}: {err}") from None
        if rate <= 0:
            raise ValueError(f"--link {text!r}: the rate must be > 0")
        if jitter > latency:
            raise ValueError(f"--link {text!r}: jitter above the latency would reorder time")
        return cls(text.strip(), rate, latency, jitter)

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8.0

    def chunk_bytes(self) -> int:
        """Read size: about 2 ms of the link (smooth), within 4-64 KiB (cheap)."""
        return int(min(64 << 10, max(4 << 10, self.bytes_per_s * 0.002)))

    def buffer_bytes(self) -> int:
        """In flight in the delay line before the reader waits: 2x the bandwidth-delay product,
        at least 1 MiB; more would only hide a slow receiver."""
        return int(max(1 << 20, 2 * self.bytes_per_s * (self.latency_s + self.jitter_s)))


def _seconds(text: str) -> str:
    return text if text.strip()[-1:].isalpha() else text + "s"  # a bare number is seconds


@dataclass(frozen=True)
class Sever:
    """At `at_s` seconds after the schedule starts, reset every live connection; refuse new
    ones for `down_s` seconds. `--sever 30s:2s` (or `30` for at 30 s, down 0)."""

    at_s: float
    down_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Sever:
        parts = text.strip().split(":")
        if len(parts) not in (1, 2):
            raise ValueError(f"--sever {text!r}: expected AT[:DOWN], e.g. 30s:2s")
        try:
            vals = [_quantity(_seconds(p), _TIME_UNITS, "time") for p in parts]
        except (ValueError, IndexError):
            raise ValueError(f"--sever {text!r}: expected AT[:DOWN], e.g. 30s:2s") from None
        return cls(vals[0], vals[1] if len(vals) == 2 else 0.0)


class TokenBucket:
    """`rate` bytes a second, up to `burst` saved while idle. It starts empty and may go into
    debt: taking n bytes returns how long to wait until they have been paid for, so N bytes
    never pass faster than N / rate (plus at most one burst)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self.tokens, self.stamp = 0.0, clock()

    def take(self, n: int) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass
class LinkStats:
    connections: int = 0
    severed: int = 0
    refused: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class _Pipe:
    """One direction of one connection: bucket -> delay line -> writer."""

    def __init__(self, spec: LinkSpec, rng: random.Random, stats: LinkStats, direction: str):
        self.spec, self.rng, self.stats, self.direction = spec, rng, stats, direction
        self.bucket = TokenBucket(spec.bytes_per_s, spec.chunk_bytes())
        self.line: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        self.in_line = 0
        self.room = asyncio.Event()
        self.last_delivery = 0.0

    def _delivery(self, sent_at: float) -> float:
        delay = self.spec.latency_s
        if self.spec.jitter_s:
            delay += self.rng.uniform(-self.spec.jitter_s, self.spec.jitter_s)
        self.last_delivery = max(self.last_delivery, sent_at + delay)  # FIFO, as TCP
        return self.last_delivery

    async def read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        size, cap = self.spec.chunk_bytes(), self.spec.buffer_bytes()
        while True:
            data = await reader.read(size)
            if not data:
                self.line.put_nowait((self._delivery(loop.time()), None))  # EOF, in order
                return
            wait = self.bucket.take(len(data))
            if wait > 0:
                await asyncio.sleep(wait)  # serialization: the bytes are on the wire until now
            while self.in_line + len(data) > cap:  # a slow receiver: stop reading (TCP pushes back)
                self.room.clear()
                await self.room.wait()
            self.in_line += len(data)
            self.line.put_nowait((self._delivery(loop.time()), data))

    async def write(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.line.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if data is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(data)
            self.stats.bytes[self.direction] += len(data)  # handed to the receiver's socket
            await writer.drain()
            self.in_line -= len(data)
            self.room.set()


class WanProxy:
    """A listening port in front of one node's stage service. `target()` gives the node's real
    (host, port), or None while it is starting."""

    def __init__(
        self,
        spec: LinkSpec,
        target: Callable[[], tuple[str, int] | None],
        seed: int = 0,
        name: str = "link",
    ):
        self.spec, self.target, self.name = spec, target, name
        self.rng = random.Random(seed)
        self.stats = LinkStats()
        self.port = 0
        self.down_until = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def sever(self, down_s: float = 0.0) -> int:
        """Reset every live connection; refuse new ones for `down_s`. Returns how many."""
        self.down_until = max(self.down_until, time.monotonic() + down_s)
        n = len(self._conns)
        self.stats.severed += n
        self._drop_all()
        if n:
            log.info("wan %s: severed %d connection(s), down %.1f s", self.name, n, down_s)
        return n

    def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()  # a reset, not a goodbye: what a dropped link looks like
        self._writers.clear()
        for t in list(self._conns):
            t.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.down_until:
            self.stats.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = await self._wait_target()
        if address is None:
            log.warning(
                "wan %s: no target after %.0f s: connection closed", self.name, TARGET_WAIT_S
            )
            return
        try:
            t_reader, t_writer = await asyncio.wait_for(
                asyncio.open_connection(*address), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as err:
            # its node is gone (killed, restarting): the dialer sees a reset, as from a dead host
            log.debug("wan %s: cannot reach %s:%d: %s", self.name, *address, err)
            return
        self._writers.add(t_writer)
        self.stats.connections += 1
        up = _Pipe(self.spec, self.rng, self.stats, "up")  # dialer -> node
        down = _Pipe(self.spec, self.rng, self.stats, "down")  # node -> dialer
        tasks = [
            asyncio.create_task(up.read(reader)),
            asyncio.create_task(up.write(t_writer)),
            asyncio.create_task(down.read(t_reader)),
            asyncio.create_task(down.write(writer)),
        ]
        try:
            # both writers done = both directions closed cleanly; any error ends the connection
            pending = set(tasks)
            writers = {tasks[1], tasks[3]}
            while writers & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() for t in done if not t.cancelled()):
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._writers.discard(t_writer)
            t_writer.transport.abort()

    async def _wait_target(self) -> tuple[str, int] | None:
        deadline = time.monotonic() + TARGET_WAIT_S
        while time.monotonic() < deadline:
            address = self.target()
            if address is not None:
                return address
            await asyncio.sleep(0.05)
        return None


class WanEmulator:
    """Proxies on their own event loop in a background thread, for a launcher that is not async
    (`resbm simulate`): `add` one per node before it starts, `arm` the sever schedule once the
    swarm is up, `close` at the end."""

    def __init__(self, spec: LinkSpec, severs: tuple[Sever, ...] = (), seed: int = 0):
        self.spec, self.severs, self.seed = spec, tuple(severs), seed
        self.proxies: list[WanProxy] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="wan", daemon=True)
        self._thread.start()
        self._schedule: asyncio.Future | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def add(self, name: str, target: Callable[[], tuple[str, int] | None]) -> int:
        """A proxy for one node; returns the port its peers must dial (its --announce)."""
        proxy = WanProxy(self.spec, target, seed=self.seed + len(self.proxies), name=name)
        port = self._call(proxy.start())
        self.proxies.append(proxy)
        return port

    def arm(self) -> None:
        """Start the sever schedule's clock (seconds from now)."""
        if self.severs and self._schedule is None:
            self._schedule = asyncio.run_coroutine_threadsafe(self._severing(), self.loop)

    async def _severing(self) -> None:
        t0 = time.monotonic()
        for s in sorted(self.severs, key=lambda s: s.at_s):
            await asyncio.sleep(max(0.0, t0 + s.at_s - time.monotonic()))
            n = sum(p.sever(s.down_s) for p in self.proxies)
            log.warning("wan: severed %d connection(s) at %.0f s, down %.1f s", n, s.at_s, s.down_s)

    def stats(self) -> dict:
        total = LinkStats()
        for p in self.proxies:
            total.connections += p.stats.connections
            total.severed += p.stats.severed
            total.refused += p.stats.refused
            for k, v in p.stats.bytes.items():
                total.bytes[k] += v
        return {"link": self.spec.text, **total.__dict__}

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        if self._schedule is not None:
            self._schedule.cancel()

        async def stop_all() -> None:
            await asyncio.gather(*(p.stop() for p in self.proxies))

        with contextlib.suppress(Exception):
            self._call(stop_all(), 15.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
