"""A node's neighbours: its links to every replica of the stages before and after it.

Links are symmetric: a node dials the replicas of the next stage (found in the DHT, or given as
`--next`) and accepts whoever dials it; the Hello exchanged first says which stage and which node
a link leads to, and a neighbour whose swarm config differs is refused with a reason. Every
validated message from any link lands in one inbox, in arrival order, for the node's single worker;
a link that closes puts a LinkDown there, so the worker sees deaths in order with the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from common.identity import Identity
from common.logs import Repeats
from node.data import MicrobatchId
from node.guard import BANNED_PREFIX, GARBAGE, PeerGuard
from node.handshake import Handshake
from node.ops_config import PeerLimits
from node.transport.diagnostics import caller_host
from node.transport.inbox import LinkDown, LinkUp, PeerInbox
from node.transport.link import CHUNK_CAP, Link, LinkClosed, LinkSettings
from node.transport.security import auth_refusal
from node.transport.server import dial, refuse_crowded, refuse_invalid, start_server
from node.version import VERSION
from node.wire.codec import WireError, payload_bytes
from node.wire.kinds import NODE_ID_PATTERN
from node.wire.messages import Backward, ErrorReport, Forward, Hello, MessageError

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0
LOGGED_REFUSALS = 5  # refusals of one link that are logged; the rest are counted only


def link_settings(cfg) -> LinkSettings:
    """A node's link settings from its NodeConfig (also what `simulate --link` proxies use)."""
    max_bytes = int(cfg.max_message_mb * (1 << 20))
    limits = getattr(cfg, "limits", None) or PeerLimits()
    # a recovery report posts up to two steps' tensors at once (recovery.replay_to): the
    # outbox bound is never below that, whatever limits.max_outbox_mb says (review)
    shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim)
    burst = 4 * (2 * cfg.microbatches + 16) * payload_bytes(cfg.wire_codec, shape)
    return LinkSettings(
        max_outbox_bytes=max(int(limits.max_outbox_mb * (1 << 20)), burst),
        codec=cfg.wire_codec,
        max_message_bytes=max_bytes,
        chunk_bytes=min(max(max_bytes // 4, 4096), CHUNK_CAP),  # every peer accepts CHUNK_CAP
        min_bandwidth_bps=cfg.min_bandwidth_mbps * 1e6,
        base_timeout_s=cfg.base_timeout_s,
    )


KEEP_CLOSED = 64  # closed links kept a side (their counts outlive them in `retired`)


@dataclass
class Retired:
    """The traffic counters of pruned links, summed (Link's counter names)."""

    bytes_sent: Counter = field(default_factory=Counter)
    bytes_received: Counter = field(default_factory=Counter)
    messages_sent: Counter = field(default_factory=Counter)
    codec_seconds: float = 0.0
    send_seconds: float = 0.0


def _hello_only(raw) -> WireError | None:
    """Before the handshake ends, a peer may send only its Hello (or an error): anything else is
    refused from its header, undecoded (a stranger's big forwards were decoded, on the shared
    decode threads, and charged to nobody: a review, #10 M5)."""
    kind = raw.WhichOneof("body")
    if kind in ("hello", "error"):
        return None
    return WireError("INVALID_ARGUMENT", f"expected a Hello first, got a {kind}")


class PeeringError(RuntimeError):
    """A neighbour cannot be reached or refuses us; the message says why."""


@dataclass
class Neighbours:
    stage: int
    n_stages: int
    fingerprint: str
    settings: LinkSettings
    tensor_shape: tuple[int, int, int]
    batch_size: int
    errors: Counter
    identity: Identity | None = None  # this node's key; a fresh one (a new id) when None
    security: object = None  # SecurityConfig: TLS and the swarm token (node.transport.security)
    limits: PeerLimits | None = None  # per-peer limits and bans (node.guard)

    def __post_init__(self) -> None:
        if self.identity is None:
            self.identity = Identity.generate()
        self.node_id = self.identity.node_id
        self.ups: dict[str, Link] = {}  # peer node id -> link, replicas of stage - 1
        self.downs: dict[str, Link] = {}  # replicas of stage + 1
        self.port = 0
        self.inbox = PeerInbox()
        self.guard = PeerGuard(self.limits or PeerLimits())
        self.bans: list[tuple[str, str]] = []  # (peer, reason), in order
        self._tasks: set[asyncio.Task] = set()
        self._channels: list = []
        self._server = None
        self._dialing: set[str] = set()
        self._dial_failures = Repeats(log)
        self._crowding = Repeats(log)
        self._handshakes: Counter = Counter()  # host -> incoming links not yet attached
        self._unlinkable: set[str] = set()
        # (peer, side, step) -> why a tensor of that step is refused, or None (node/daemon.py)
        self.step_filter = None
        self.retired = Retired()  # the counts of pruned links

    # ---- lifecycle -----------------------------------------------------------------------
    async def listen(self, address: str) -> int:
        self._server, self.port = await start_server(
            address, self._accept, self.settings, self.security
        )
        return self.port

    async def close(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self.links()))  # each waits its peer
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        for channel in self._channels:
            try:
                await asyncio.wait_for(channel.close(), 5)
            except Exception as err:
                log.debug("closing a channel: %s", err)

    def links(self) -> list[Link]:
        return [*self.ups.values(), *self.downs.values()]

    def counted(self) -> list:
        """What the node's traffic counters sum over: its links, and those pruned (`retired`)."""
        return [self.retired, *self.links()]

    def _prune(self, side: dict[str, Link]) -> None:
        """Closed links are dropped, all but the newest KEEP_CLOSED of a side (a stranger's
        flood of fresh keys left one per key, for ever: #10 H5); their counts are kept."""
        closed = [p for p, lk in side.items() if lk.closed.is_set()]
        for peer in closed[: max(0, len(closed) - KEEP_CLOSED)]:
            gone = side.pop(peer)
            for f in ("bytes_sent", "bytes_received", "messages_sent"):
                getattr(self.retired, f).update(getattr(gone, f))
            self.retired.codec_seconds += gone.codec_seconds
            self.retired.send_seconds += gone.send_seconds

    def live(self, side: str) -> dict[str, Link]:
        links = self.ups if side == "up" else self.downs
        return {p: lk for p, lk in links.items() if not lk.closed.is_set()}

    def side_of(self, link: Link) -> str:
        return "up" if link.peer_stage == self.stage - 1 else "down"

    # ---- handshake -----------------------------------------------------------------------
    def _handshake_for(self) -> Handshake:
        return Handshake(self.identity, self.stage, self.fingerprint)

    def _check_hello(self, msg) -> str | None:
        if not isinstance(msg, Hello):
            return f"expected a Hello first, got {type(msg).__name__}"
        if msg.model_fingerprint != self.fingerprint:
            return (
                f"swarm config mismatch: peer stage {msg.stage} has {msg.model_fingerprint}, "
                f"stage {self.stage} has {self.fingerprint} (model, optimizer, seed, batch, "
                "microbatches, corpus and wire codec must all match)"
            )
        if msg.version.split(".")[:2] != VERSION.split(".")[:2]:
            return f"peer runs resbm {msg.version}, this node {VERSION}: upgrade the older one"
        if msg.stage not in (self.stage - 1, self.stage + 1) or msg.stage >= self.n_stages:
            return f"stage {msg.stage} is not a neighbour of stage {self.stage}"
        if not msg.peer_id:
            return "a Hello without a node id"
        if not re.fullmatch(NODE_ID_PATTERN, msg.peer_id):  # not match(): a final newline
            return "a node id may hold only letters, digits and ._:@+=- (128 at most)"
        return None

    def _new_link(self, stream, name: str) -> Link:
        link = Link(stream, self.settings, self.tensor_shape, self.batch_size, name)
        link.precheck = _hello_only  # until attached (_attach): nothing else is decoded
        link.start()
        return link

    def has_live(self, peer_id: str) -> bool:
        link = self.ups.get(peer_id) or self.downs.get(peer_id)
        return link is not None and not link.closed.is_set()

    async def dial(
        self, address: str, timeout_s: float, stage: int | None = None, node: str | None = None
    ) -> str:
        """Open a link to a replica of `stage` (default: the next one; the previous one when we
        are not reachable ourselves), retrying until it answers or `timeout_s` passes; returns
        its node id, proven by its signature. With `node` (the id a DHT record gave for this
        address), whoever answers there must prove it is that node."""
        expect = self.stage + 1 if stage is None else stage
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            channel, call = dial(address, self.settings, self.security)
            link = self._new_link(call, f"stage{self.stage}->{address}")
            try:
                hs = self._handshake_for()
                link.post(hs.offer())
                reply = await asyncio.wait_for(link.recv(), HELLO_TIMEOUT_S)
                if isinstance(reply, ErrorReport):
                    raise PeeringError(f"stage at {address} refused us: {reply.message}")
                problem = self._check_hello(reply) or hs.check_answer(reply)
                if problem:
                    raise PeeringError(f"{address}: {problem}")
                if reply.stage != expect:
                    raise PeeringError(f"{address} serves stage {reply.stage}, not {expect}")
                if node is not None and reply.peer_id != node:
                    raise PeeringError(
                        f"{address} is node {reply.peer_id}, not {node} as its DHT record says"
                    )
                link.post(hs.prove(reply))
                break
            except (LinkClosed, WireError, TimeoutError, PeeringError) as err:
                refused = await auth_refusal(call)  # a wrong/missing token: final, no retry
                link.close()
                await channel.close()
                if refused:
                    raise PeeringError(f"stage at {address} refused us: {refused}") from None
                if isinstance(err, PeeringError) or loop.time() > deadline:
                    if isinstance(err, PeeringError):
                        raise
                    raise PeeringError(
                        f"cannot reach stage {expect} at {address} within {timeout_s:.0f}s: {err}"
                    ) from None
                await asyncio.sleep(0.5)
        self._channels.append(channel)
        link.peer_stage, link.peer_id = reply.stage, reply.peer_id
        link.name = f"stage{self.stage}->{reply.peer_id}"
        self._attach(link)
        self._spawn(self._read_loop(link), f"read-{link.name}")
        return reply.peer_id

    def dial_in_background(
        self, address: str, timeout_s: float, stage: int | None = None, node: str | None = None
    ) -> None:
        """Dial a newly seen replica without blocking the worker; failures are logged only."""
        if address in self._dialing:
            return
        self._dialing.add(address)

        async def go() -> None:
            try:
                await self.dial(address, timeout_s, stage, node)
            except PeeringError as err:  # a neighbour that stays down: a line, not a flood
                self._dial_failures.failed(address, f"stage {self.stage}: {err}")
            else:
                self._dial_failures.recovered(address, f"stage {self.stage}: {address} answers")
            finally:
                self._dialing.discard(address)

        self._spawn(go(), f"dial-{address}")

    def warn_unlinkable(self, peer: str, stage: int) -> None:
        """Two neighbours that both cannot accept connections can never link: say so once."""
        if peer not in self._unlinkable:
            self._unlinkable.add(peer)
            log.warning(
                "stage %d: node %s (stage %d) is not reachable, and neither is this node "
                "(--no-reachable): no link between us is possible; open a port on one side",
                self.stage,
                peer,
                stage,
            )

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _crowded(self, host: str) -> str | None:
        """Why one more link from `host` is refused (every link holds buffers), or None."""
        lim = self.guard.limits
        live = [lk for lk in self.links() if not lk.closed.is_set()]
        total = len(live) + sum(self._handshakes.values())
        if total >= lim.max_links:
            return f"this node holds {total} links, its limit (limits.max_links)"
        mine = sum(1 for lk in live if lk.host == host) + self._handshakes[host]
        if mine >= lim.max_links_per_host:
            return f"{mine} links from {host} already (limits.max_links_per_host)"
        return None

    async def _accept(self, context) -> None:
        """gRPC handler for an incoming link; runs until that link closes."""
        host = caller_host(context)
        crowded = self._crowded(host)
        if crowded is not None:  # before anything is read or decoded
            self._crowding.failed("crowded", f"stage {self.stage}: refused a link: {crowded}")
            await refuse_crowded(context, crowded)
            return
        self._handshakes[host] += 1
        try:
            link = await self._handshake(context, host)
        finally:  # from here an attached link counts as a live one (review: it counted twice)
            self._handshakes[host] -= 1
            if self._handshakes[host] <= 0:
                del self._handshakes[host]
        if link is not None:
            await self._serve(link)

    async def _handshake(self, context, host: str) -> Link | None:
        """Read and check the offer, answer it, read and check the proof (node/handshake.py);
        the attached link, or None (refused, told why)."""
        link = self._new_link(context, f"stage{self.stage}<-peer")
        link.host = host
        hello = await self._read_hello(link, context)
        if hello is None:
            return
        problem = self._check_hello(hello)
        left = self.guard.banned(getattr(hello, "peer_id", ""))
        if problem is None and left is not None:
            problem = (
                f"{BANNED_PREFIX} for {left:.0f} more s: {self.guard.reasons.get(hello.peer_id)}"
            )
            link.post(ErrorReport(None, "PERMISSION_DENIED", problem))
            await link.aclose()
            return
        if problem is None and self.has_live(hello.peer_id):
            problem = f"stage {self.stage} already has a live link to node {hello.peer_id}"
        if problem:
            link.post(ErrorReport(None, "FAILED_PRECONDITION", problem))
            await link.aclose()
            return
        hs = self._handshake_for()
        link.post(hs.answer(hello))
        proof = await self._read_hello(link, context)
        if proof is None:
            return
        problem = self._check_hello(proof) or hs.check_proof(hello, proof)
        if problem:  # a claim of an id it could not prove: nothing is held against that id
            link.post(ErrorReport(None, "UNAUTHENTICATED", f"node {hello.peer_id}: {problem}"))
            await link.aclose()
            return
        link.name = f"stage{self.stage}<-{hello.peer_id}"
        link.peer_stage, link.peer_id = hello.stage, hello.peer_id
        self._attach(link)
        return link

    async def _read_hello(self, link: Link, context):
        """The next handshake message, or None (the link is closed; told why if garbage)."""
        try:
            return await asyncio.wait_for(link.recv(), HELLO_TIMEOUT_S)
        except WireError as err:  # garbage instead of a Hello: say so, not OK
            link.close()
            await refuse_invalid(context, f"expected a Hello: {err}")
        except (LinkClosed, TimeoutError):
            link.close()
        return None

    async def _serve(self, link: Link) -> None:
        """Read an accepted link until it closes."""
        # the RPC lives as long as this handler: end it when the link closes on our side too
        # (e.g. a write timed out), not only when the peer hangs up
        reader = asyncio.ensure_future(self._read_loop(link))
        closed = asyncio.ensure_future(link.closed.wait())
        try:
            await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not reader.done():
                reader.cancel()
                await self.inbox.put((link, LinkDown(f"{link.name} closed")))
        await link.aclose()

    def _attach(self, link: Link) -> None:
        link.precheck = lambda raw: self._precheck(link, raw)
        side = self.ups if link.peer_stage == self.stage - 1 else self.downs
        old = side.get(link.peer_id)
        if old is not None and old is not link:
            old.close()
        side[link.peer_id] = link
        self._prune(side)
        self.inbox.put_nowait((link, LinkUp()))
        log.info("stage %d: linked with %s (stage %d)", self.stage, link.peer_id, link.peer_stage)

    # ---- receiving -----------------------------------------------------------------------
    async def _read_loop(self, link: Link) -> None:
        """Read one peer's stream into the inbox, never faster than its limits allow (we stop
        reading; gRPC flow control holds the peer back) and never from a banned peer."""
        limits = self.guard.limits
        budget = int(limits.max_inbox_mb * (1 << 20))
        try:
            while True:  # the worker has enough of this peer's messages, or of everyone's
                while self.inbox.full_for(link, limits.max_in_flight, budget):
                    await self.inbox.wait_room(1.0)
                await self.guard.throttle(link.peer_id)
                try:
                    msg = await link.recv()  # idle is normal; keepalive pings detect dead peers
                    problem = self._inspect(link, msg)
                except WireError as err:  # without its traceback: that holds this frame,
                    problem = err.with_traceback(None)  # so a cycle (with the message) that
                    # only a full collection would free, one per refusal of a flood
                self.guard.charge(link.peer_id, link.decode_s)  # refused or not
                link.decode_s = 0.0
                if self.guard.banned(link.peer_id) is not None:
                    continue  # it is being told and cut off; nothing more of it is used
                if problem is not None:
                    self.refuse(link, problem)
                    continue
                await self.inbox.put((link, msg))
        except LinkClosed as err:
            self.guard.forget(link.peer_id)
            await self.inbox.put((link, LinkDown(str(err))))

    def _precheck(self, link: Link, raw) -> WireError | None:
        """A tensor message of a step the node would refuse anyway (`step_filter`, set by the
        daemon from the protocol core) is refused from its header, before its tensor is
        decoded: a stranger's flood of far-step forwards cost a decode each (#10 M5)."""
        kind = raw.WhichOneof("body")
        if self.step_filter is None or kind not in ("forward", "backward"):
            return None
        mid = getattr(raw, kind).id
        why = self.step_filter(link.peer_id, self.side_of(link), int(mid.step))
        if why is None:
            return None
        return MessageError(MicrobatchId(int(mid.step), int(mid.index)), "FAILED_PRECONDITION", why)

    def _inspect(self, link: Link, msg) -> WireError | None:
        """The outlier test on what a peer sends (decode already checked shape, codec, finite
        values and the magnitude bound): activations from upstream, gradients from downstream."""
        tensor = getattr(msg, "z", None) if isinstance(msg, Forward) else None
        if isinstance(msg, Backward):
            tensor = msg.grad
        if tensor is None:
            return None
        side = "forward" if isinstance(msg, Forward) else "backward"
        err = self.guard.check_tensor(link.peer_id, side, tensor)
        if err is not None:
            return MessageError(msg.id, err.code, str(err))
        return None

    def refuse(self, link: Link, err: WireError) -> None:
        """Count, log, and tell the peer what we refused; nothing of the message is applied.
        Garbage (not a race between honest peers) bans the peer: see node/guard.py."""
        self.errors[err.code] += 1
        over = bool(link.peer_id) and self.guard.refused(link.peer_id)
        if self.guard.refusals(link.peer_id) <= LOGGED_REFUSALS:  # a flood is not a log flood
            log.warning(
                "stage %d: refused a message from %s: %s (%s)",
                self.stage,
                link.peer_id or f"stage {link.peer_stage}",
                err,
                err.code,
            )
        mid = err.id if isinstance(err, MessageError) else None
        if err.code in GARBAGE and link.peer_id:
            link.reject(err)
            self.ban(link, f"{err.code}: {err}", mid)
        elif over:
            self.ban(link, f"more than {self.guard.limits.max_refused} refused messages "
                     "(limits.max_refused)", mid)  # fmt: skip
        elif not link.closed.is_set():
            link.reject(err)

    def ban(self, link: Link, reason: str, mid=None) -> None:
        """Refuse `link`'s peer for `ban_s`: tell it why, close the link (the node then treats
        the peer as dead and recovers its microbatches), refuse its redials meanwhile."""
        peer = link.peer_id
        if self.guard.banned(peer) is not None:
            return
        self.guard.ban(peer, reason)
        self.errors["banned"] += 1
        self.bans.append((peer, reason))
        ban_s = self.guard.limits.ban_s
        log.error("stage %d: banned node %s for %.0f s: %s", self.stage, peer, ban_s, reason)
        with contextlib.suppress(LinkClosed):
            notice = f"{BANNED_PREFIX} for {ban_s:.0f} s: {reason}"
            link.post(ErrorReport(mid, "PERMISSION_DENIED", notice))  # the id: it can check
        self._spawn(link.aclose(), f"ban-{peer}")
