"""The WAN emulator's proxy on loopback: a real TCP server behind a real `WanProxy`, bytes timed
at the receiver. Bandwidth is a lower bound on time (deterministic: the bucket never lets bytes
through early); latency and "a delay does not cap the rate" are measured side by side against a
zero-latency link in the same test, as ratios."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import pytest

from resbm.wan import LinkSpec, Sever, TokenBucket, WanEmulator, WanProxy

pytestmark = pytest.mark.loopback
N = 500_000  # bytes: 0.4 s at 10 Mbit/s


@contextlib.asynccontextmanager
async def behind_proxy(link: str, handler, seed: int = 0):
    """A server running `handler(reader, writer)`, and a proxy with `link` in front of it."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = WanProxy(LinkSpec.parse(link), lambda: ("127.0.0.1", port), seed=seed)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
        server.close()


async def sink(reader, writer):
    """Reads N bytes, then answers one byte: the sender's clock stops when all have arrived."""
    await reader.readexactly(N)
    writer.write(b"!")
    await writer.drain()
    writer.close()


async def echo(reader, writer):
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


async def send_n(port: int) -> float:
    """Seconds from the first byte sent to the receiver's answer (N bytes through)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(b"x" * N)
    assert await asyncio.wait_for(reader.readexactly(1), 60) == b"!"
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed


async def rtts(port: int, n: int = 7) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        writer.write(bytes([i]))
        assert await asyncio.wait_for(reader.readexactly(1), 10) == bytes([i])
        out.append(time.perf_counter() - t0)
    writer.close()
    return out


async def test_n_bytes_through_10mbit_take_at_least_their_serialization_time():
    async with behind_proxy("10mbit:0ms", sink) as proxy:
        elapsed = await send_n(proxy.port)
    assert elapsed >= N * 8 / 1e7, elapsed
    assert proxy.stats.bytes["up"] == N and proxy.stats.bytes["down"] == 1


async def test_a_40ms_link_still_carries_its_full_rate():
    """Side by side: 10 Mbit/s with 0 and with 40 ms. A proxy that held each chunk for the
    delay before reading the next would take ~20x longer; ours pays the 40 ms once."""
    async with behind_proxy("10mbit:0ms", sink) as fast:
        base = await send_n(fast.port)
    async with behind_proxy("10mbit:40ms", sink) as slow:
        delayed = await send_n(slow.port)
    assert delayed >= N * 8 / 1e7 + 2 * 0.040  # the data's trip, and the answer's
    assert delayed - 2 * 0.040 < 2 * base, (base, delayed)  # the rate is kept (not ~20x)


async def test_latency_adds_as_configured_each_way():
    async with behind_proxy("1000mbit:0ms", echo) as p0:
        zero = statistics.median(await rtts(p0.port))
    async with behind_proxy("1000mbit:25ms", echo) as p25:
        slow = await rtts(p25.port)
    assert min(slow) >= 2 * 0.025  # one way each direction, every time
    added = statistics.median(slow) - zero
    assert added < 0.1, (zero, slow)  # and not, say, twice that each way


async def test_jitter_stays_within_its_bound_and_never_reorders():
    """Delays are drawn per chunk in [10, 30] ms: one-byte chunks sent 1 ms apart would arrive
    out of order if each kept its own delay; the line holds each behind the one before."""
    async with behind_proxy("1000mbit:20ms:10ms", echo, seed=3) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        payload = bytes(range(200))
        for b in payload:  # 200 one-byte writes: each its own chunk with its own delay
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.001)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        writer.close()
    assert got == payload  # in order, all of it
    async with behind_proxy("1000mbit:20ms:10ms", echo, seed=4) as proxy:
        pings = await rtts(proxy.port, 15)
    assert min(pings) >= 2 * 0.010  # never below latency - jitter, each way
    assert statistics.pstdev(pings) > 0.002  # it varies
    assert statistics.median(pings) < 2 * 0.030 + 0.05  # and stays near its bound


async def test_sever_resets_connections_and_refuses_new_ones_while_down():
    async with behind_proxy("1000mbit:1ms", echo) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"a"
        assert proxy.sever(down_s=1.0) == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()

        r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)  # while down
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r2.readexactly(1), 10)
        w2.close()
        assert proxy.stats.refused == 1

        await asyncio.sleep(1.1)
        assert len(await rtts(proxy.port, 2)) == 2  # back up
        assert proxy.stats.severed == 1


async def test_a_connection_waits_for_a_node_that_is_still_starting():
    holder: list[tuple[str, int]] = []
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = WanProxy(LinkSpec.parse("100mbit:1ms"), lambda: holder[0] if holder else None)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"z")
        await asyncio.sleep(0.3)
        holder.append(("127.0.0.1", server.sockets[0].getsockname()[1]))  # now it is ready
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"z"
        writer.close()
    finally:
        await proxy.stop()
        server.close()


def test_the_emulator_thread_serves_and_severs_on_schedule():
    """The launcher's side: proxies on a background loop, the schedule armed from sync code."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    wan = WanEmulator(LinkSpec.parse("100mbit:5ms"), (Sever(0.5, 0.0),), seed=1)
    try:
        front = wan.add("node0", lambda: ("127.0.0.1", port))
        client = socket.create_connection(("127.0.0.1", front), timeout=10)
        conn, _ = srv.accept()
        client.sendall(b"hello")
        conn.settimeout(10)
        assert conn.recv(5) == b"hello"
        wan.arm()
        client.settimeout(10)
        assert client.recv(1) == b""  # or a reset: the schedule cut it
    except ConnectionResetError:
        pass
    finally:
        stats = wan.stats()
        wan.close()
        srv.close()
    assert stats["severed"] == 1 and stats["bytes"]["up"] == 5 and stats["link"] == "100mbit:5ms"


# ---- pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rate", "latency", "jitter"),
    [
        ("80mbit:40ms", 80e6, 0.040, 0.0),
        ("1000mbit:40ms", 1e9, 0.040, 0.0),
        ("10mbit:40ms:5ms", 1e7, 0.040, 0.005),
        ("1.5gbit:0.5s", 1.5e9, 0.5, 0.0),
        ("512kbit:300us", 512e3, 300e-6, 0.0),
    ],
)
def test_link_specs_parse(text, rate, latency, jitter):
    spec = LinkSpec.parse(text)
    assert (spec.text, spec.rate_bps, spec.latency_s, spec.jitter_s) == (
        text,
        rate,
        pytest.approx(latency),
        pytest.approx(jitter),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("80MBps:40ms", "rate '80MBps'"),  # bytes: 80mbps (bits) is fine
        ("80mbit:40", "latency '40'"),
        ("0mbit:40ms", "> 0"),
        ("10mbit:10ms:20ms", "reorder"),
        ("a:b:c:d", "RATE[:LATENCY[:JITTER]]"),  # a rate alone is fine: no added latency
    ],
)
def test_bad_link_specs_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match="--link") as err:
        LinkSpec.parse(text)
    assert says in str(err.value)


def test_sever_specs_parse():
    assert Sever.parse("30s:2s") == Sever(30.0, 2.0)
    assert Sever.parse("45") == Sever(45.0, 0.0)
    assert Sever.parse("1.5:500ms") == Sever(1.5, 0.5)
    with pytest.raises(ValueError, match="--sever"):
        Sever.parse("soon")


def test_token_bucket_never_lets_bytes_through_early():
    now = [0.0]
    bucket = TokenBucket(rate=1000.0, burst=100, clock=lambda: now[0])
    assert bucket.take(500) == pytest.approx(0.5)  # starts empty: pay for all of it
    now[0] = 0.5
    assert bucket.take(100) == pytest.approx(0.1)
    now[0] = 10.0  # idle: saves at most one burst
    assert bucket.take(100) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)
