"""A link: one end of the long-lived bidirectional stream between two adjacent stage processes.

The same object wraps the stream whether this process dialed it (a grpc.aio call) or accepted it
(the servicer's context): both have read() and write(). Sends go through an ordered outbox served
by one writer task, so a chunked tensor is never interleaved with another message, and compute
never waits on the network. Every write has a deadline that scales with its size, so a slow link
is not mistaken for a dead peer, and a dead one is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from node.transport.decoding import UNDECODABLE
from node.wire._pb import stage_pb2 as pb
from node.wire.codec import WireCodec, WireError, payload_bytes
from node.wire.messages import (
    ErrorReport,
    Message,
    MessageError,
    Reassembler,
    from_pb,
    split,
    to_pb,
    wire_size,
)

log = logging.getLogger(__name__)
MESSAGE_COST = 1024  # bytes a queued message holds at least, counted against max_outbox_bytes
END_WAIT_S = 3.0  # after our half-close, how long the peer may take to read the rest and end
_SERIALS = itertools.count(1)


@dataclass(frozen=True)
class LinkSettings:
    codec: WireCodec = WireCodec.bf16
    max_message_bytes: int = 8 << 20  # per gRPC message; bigger tensors are chunked
    chunk_bytes: int = 128 << 10  # never more than CHUNK_CAP: what every node reads
    min_bandwidth_bps: float = 1e6  # deadlines assume at least this many bits/s ...
    base_timeout_s: float = 30.0  # ... plus this much slack for latency and scheduling
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    max_outbox_bytes: int = 256 << 20  # queued for a peer that does not read: then we close
    # server limits (#10 L): a link is one long stream, so no connection age; but no
    # connection holds more than this many streams, none stays open idle (no call) past this,
    # and the whole server runs at most this many calls (links are capped lower: limits.*)
    max_streams_per_connection: int = 64
    max_idle_connection_s: float = 300.0
    max_rpcs: int = 512

    def timeout_for(self, nbytes: int) -> float:
        return self.base_timeout_s + 8 * nbytes / self.min_bandwidth_bps


# The largest chunk any node sends, whatever its own max_message_mb, and so (plus framing) the
# largest message any node's server reads: honest nodes configured differently never refuse each
# other, and nobody makes a server read more. What a stream of messages costs a server is memory
# inside gRPC's core, growing with their size whether they are refused or not (#10 H5).
CHUNK_CAP = 128 << 10
FRAMING_SLACK = 64 << 10


def receive_limit(s: LinkSettings) -> int:
    """The largest message a node's server reads (gRPC refuses a bigger one from its length
    prefix, unread, and ends that stream with RESOURCE_EXHAUSTED)."""
    return CHUNK_CAP + FRAMING_SLACK


def channel_options(s: LinkSettings) -> list[tuple[str, Any]]:
    """Options for long-lived internet streams: explicit size limits and keepalive pings."""
    return [
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.max_receive_message_length", receive_limit(s)),
        ("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def server_options(s: LinkSettings) -> list[tuple[str, Any]]:
    return [
        *channel_options(s),
        # accept the client's pings at its keepalive rate instead of answering GOAWAY
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(s.keepalive_s * 1000) // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", int(s.keepalive_s * 1000) // 2),
        ("grpc.max_concurrent_streams", s.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(s.max_idle_connection_s * 1000)),
    ]


class LinkClosed(ConnectionError):
    pass


INLINE_DECODE_BYTES = 64 << 10  # smaller messages are decoded on the event loop
# Decoding runs on these threads (torch releases the GIL for the copy and the checks). Two: a
# peer's big tensor does not queue everyone else's; each link awaits its own, so order holds.
_DECODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resbm-decode")


def _decode(whole, shape, batch_size, allowed) -> tuple[Message | None, WireError | None, float]:
    """from_pb, and the time it took (charged to the peer: node/guard.py), refused or not. Wall
    time on the decoding thread: torch's own threads do part of the work, which this thread's
    CPU time leaves out (a review found it undercounted with several torch threads)."""
    t0 = time.perf_counter()
    try:
        return from_pb(whole, shape, batch_size, allowed), None, time.perf_counter() - t0
    except WireError as err:
        return None, err.with_traceback(None), time.perf_counter() - t0


class Link:
    """One end of a stage<->stage stream. `peer_stage` is known once the Hello is exchanged."""

    def __init__(
        self,
        stream: Any,  # grpc.aio.StreamStreamCall or grpc.aio.ServicerContext
        settings: LinkSettings,
        tensor_shape: tuple[int, ...],
        batch_size: int,
        name: str,
    ):
        self.stream, self.settings, self.name = stream, settings, name
        self.serial = next(_SERIALS)  # tells a replaced link's late close from the peer's death
        self.tensor_shape, self.batch_size = tensor_shape, batch_size
        self.peer_stage: int | None = None
        self.peer_id = ""  # the peer's node id, from its Hello
        self.host = ""  # an accepted link: the peer's IP address (link caps, node/peering.py)
        self.bytes_sent = {"forward": 0, "backward": 0, "other": 0}
        self.bytes_received = {"forward": 0, "backward": 0, "other": 0}  # metrics (node/metrics)
        self.messages_sent = {"forward": 0, "backward": 0, "other": 0}
        self._rx_key = "other"  # a chunk's bytes count toward the message it belongs to
        self.send_seconds = 0.0  # time inside stream.write: transport
        self.codec_seconds = 0.0  # encode on post, decode on recv
        self.decode_s = 0.0  # CPU seconds decoding this peer's messages (the reader charges it)
        self.closed = asyncio.Event()
        self._outbox: asyncio.Queue[list[pb.LinkMessage] | None] = asyncio.Queue()
        self._unsent = 0  # messages posted but not yet written
        self._unsent_bytes = 0  # ...and their bytes (bounded: settings.max_outbox_bytes)
        self._writer: asyncio.Task | None = None
        # never buffer more than one tensor of the shape and codec this link carries
        self._reassembler = Reassembler(payload_bytes(settings.codec, tensor_shape))
        self._allowed = frozenset({settings.codec})
        # a check on the undecoded message (its header): a WireError refuses it unread
        self.precheck: Callable[[pb.LinkMessage], WireError | None] | None = None

    # ---- sending -------------------------------------------------------------------------
    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name=f"{self.name}-writer")

    def post(self, msg: Message) -> None:
        """Queue a message (encoded now, so the tensor may be reused by the caller)."""
        if self.closed.is_set():
            raise LinkClosed(f"{self.name} is closed")
        kind = type(msg).__name__.lower()
        t0 = time.perf_counter()
        parts = split(to_pb(msg, self.settings.codec), min(self.settings.chunk_bytes, CHUNK_CAP))
        self.codec_seconds += time.perf_counter() - t0
        key = kind if kind in ("forward", "backward") else "other"
        size = sum(wire_size(p) for p in parts)
        # the outbox's cost in memory, not on the wire: a queued message is Python objects of
        # about a kilobyte however small its bytes (a flood of refusals to a peer that never
        # read them grew a node by 110 MB under its 256 MB byte bound: resbm bench flood)
        held = sum(max(wire_size(p), MESSAGE_COST) for p in parts)
        if self._unsent_bytes + held > self.settings.max_outbox_bytes:
            # a peer that stops reading (or reads a trickle, inside every write deadline)
            # must not hold our memory without bound (#10 H5)
            mb = self.settings.max_outbox_bytes >> 20
            log.warning("%s: over %d MB wait for a peer that does not read; closing the "
                        "link (limits.max_outbox_mb)", self.name, mb)  # fmt: skip
            self.close()
            raise LinkClosed(f"{self.name}: the peer does not read (limits.max_outbox_mb)")
        self.bytes_sent[key] += size  # counted when handed over
        self.messages_sent[key] += 1
        self._unsent += 1
        self._unsent_bytes += held
        self._outbox.put_nowait(parts)

    async def drain(self) -> None:
        """Wait until every queued message is written, or raise if the link dies first."""
        joined = asyncio.ensure_future(self._outbox.join())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({joined, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
            closed.cancel()
        if self.closed.is_set() and self._unsent:
            raise LinkClosed(f"{self.name} closed with unsent messages")

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                parts = await self._outbox.get()
                if parts is None:  # close() was called: stop even if a cancel got lost
                    return
                for part in parts:
                    t0 = loop.time()
                    limit = self.settings.timeout_for(wire_size(part))
                    await asyncio.wait_for(self.stream.write(part), limit)
                    self.send_seconds += loop.time() - t0
                self._unsent -= 1
                self._unsent_bytes -= sum(max(wire_size(p), MESSAGE_COST) for p in parts)
                self._outbox.task_done()
        except asyncio.CancelledError:
            raise
        except TimeoutError as err:
            log.warning("%s: write timed out (%s); closing the link", self.name, err)
            self.close()
        except Exception as err:
            log.warning("%s: write failed: %s", self.name, err)
            self.close()

    # ---- receiving -----------------------------------------------------------------------
    async def recv(self) -> Message:
        """Next complete, validated message. Raises WireError (the link stays usable) or
        LinkClosed (it does not)."""
        while True:
            try:
                raw = await self.stream.read()
            except grpc.aio.AioRpcError as err:
                self.close()
                raise LinkClosed(f"{self.name}: {err.code().name}: {err.details()}") from None
            except asyncio.CancelledError:
                if self.closed.is_set():  # our own close() cancelled the call under us
                    raise LinkClosed(f"{self.name}: closed") from None
                raise
            except Exception as err:  # a broken stream ends this link only
                self.close()
                raise LinkClosed(f"{self.name}: {err}") from None
            if raw is grpc.aio.EOF or raw is None:
                self.close()
                raise LinkClosed(f"{self.name}: peer closed the stream")
            if raw is UNDECODABLE:
                raise WireError("INVALID_ARGUMENT", "a message that does not parse")
            kind = raw.WhichOneof("body")
            if kind != "chunk":
                self._rx_key = kind if kind in ("forward", "backward") else "other"
            self.bytes_received[self._rx_key] += wire_size(raw)  # refused ones too
            whole = self._reassembler.feed(raw)
            if whole is None:
                continue
            if self.precheck is not None and (problem := self.precheck(whole)) is not None:
                raise problem  # refused before its tensor is decoded (#10 M5)
            args = (whole, self.tensor_shape, self.batch_size, self._allowed)
            if wire_size(whole) < INLINE_DECODE_BYTES:  # the hop to a thread costs more
                msg, err, cpu_s = _decode(*args)
            else:  # off the event loop: one peer's big tensors do not stall the others (M5)
                loop = asyncio.get_running_loop()
                msg, err, cpu_s = await loop.run_in_executor(_DECODER, _decode, *args)
            self.codec_seconds += cpu_s
            self.decode_s += cpu_s
            if err is not None:
                raise err
            return msg

    def reject(self, err: WireError) -> None:
        """Tell the peer what we refused and why; the stream stays open."""
        mid = err.id if isinstance(err, MessageError) else None
        with contextlib.suppress(LinkClosed):
            self.post(ErrorReport(mid, err.code, str(err)))

    # ---- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._outbox.put_nowait(None)  # wakes the writer even if the cancel below is lost
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        cancel = getattr(self.stream, "cancel", None)
        if cancel is not None:  # client side: end the call
            cancel()

    async def aclose(self) -> None:
        """Flush what is queued (bounded by the deadline), then close."""
        if not self.closed.is_set():
            with contextlib.suppress(LinkClosed, TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self.drain(), self.settings.base_timeout_s)
            done_writing = getattr(self.stream, "done_writing", None)
            if done_writing is not None:  # the dialing side: half-close, then let the peer end
                with contextlib.suppress(Exception):  # the call (a cancel could drop the last
                    await asyncio.wait_for(done_writing(), 5)  # messages, e.g. a STEP_DONE)
                    await asyncio.wait_for(self.stream.code(), END_WAIT_S)
        self.close()
        if self._writer is not None:  # bounded: a cancellation can be lost inside a write
            await asyncio.wait({self._writer}, timeout=5)
