"""A node's neighbours: its links to every replica of the stages before and after it.

Links are symmetric: a node dials the replicas of the next stage (found in the DHT, or given as
`--next`) and accepts whoever dials it; the Hello exchanged first says which stage and which node
a link leads to, and a neighbour whose swarm config differs is refused with a reason. Every
validated message from any link lands in one inbox, in arrival order, for the node's single worker;
a link that closes puts a LinkDown there, so the worker sees deaths in order with the data.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from node.transport.link import Link, LinkClosed, LinkSettings
from node.transport.server import dial, start_server
from node.version import VERSION
from node.wire.codec import WireError
from node.wire.messages import ErrorReport, Hello

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0


class LinkDown:
    """Inbox marker: a link closed."""

    def __init__(self, reason: str):
        self.reason = reason


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
    node_id: str = ""

    def __post_init__(self) -> None:
        self.ups: dict[str, Link] = {}  # peer node id -> link, replicas of stage - 1
        self.downs: dict[str, Link] = {}  # replicas of stage + 1
        self.port = 0
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._channels: list = []
        self._server = None
        self._dialing: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------
    async def listen(self, address: str) -> int:
        self._server, self.port = await start_server(address, self._accept, self.settings)
        if not self.node_id:
            self.node_id = f"stage{self.stage}:{self.port}"
        return self.port

    async def close(self) -> None:
        for link in self.links():
            await link.aclose()
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

    def live(self, side: str) -> dict[str, Link]:
        links = self.ups if side == "up" else self.downs
        return {p: lk for p, lk in links.items() if not lk.closed.is_set()}

    def side_of(self, link: Link) -> str:
        return "up" if link.peer_stage == self.stage - 1 else "down"

    # ---- handshake -----------------------------------------------------------------------
    def _hello(self) -> Hello:
        return Hello(self.stage, self.fingerprint, self.node_id, VERSION)

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
        return None

    def _new_link(self, stream, name: str) -> Link:
        link = Link(stream, self.settings, self.tensor_shape, self.batch_size, name)
        link.start()
        return link

    def has_live(self, peer_id: str) -> bool:
        link = self.ups.get(peer_id) or self.downs.get(peer_id)
        return link is not None and not link.closed.is_set()

    async def dial(self, address: str, timeout_s: float) -> str:
        """Open a link to a replica of the next stage, retrying until it answers or `timeout_s`
        passes; returns its node id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            channel, call = dial(address, self.settings)
            link = self._new_link(call, f"stage{self.stage}->{address}")
            try:
                link.post(self._hello())
                reply = await asyncio.wait_for(link.recv(), HELLO_TIMEOUT_S)
                if isinstance(reply, ErrorReport):
                    raise PeeringError(f"stage at {address} refused us: {reply.message}")
                problem = self._check_hello(reply)
                if problem:
                    raise PeeringError(f"{address}: {problem}")
                if reply.stage != self.stage + 1:
                    raise PeeringError(f"{address} serves stage {reply.stage}, not the next one")
                break
            except (LinkClosed, WireError, TimeoutError, PeeringError) as err:
                link.close()
                await channel.close()
                if isinstance(err, PeeringError) or loop.time() > deadline:
                    if isinstance(err, PeeringError):
                        raise
                    raise PeeringError(
                        f"cannot reach the next stage at {address} within {timeout_s:.0f}s: {err}"
                    ) from None
                await asyncio.sleep(0.5)
        self._channels.append(channel)
        link.peer_stage, link.peer_id = reply.stage, reply.peer_id
        link.name = f"stage{self.stage}->{reply.peer_id}"
        self._attach(link)
        self._spawn(self._read_loop(link), f"read-{link.name}")
        return reply.peer_id

    def dial_in_background(self, address: str, timeout_s: float) -> None:
        """Dial a newly seen replica without blocking the worker; failures are logged only."""
        if address in self._dialing:
            return
        self._dialing.add(address)

        async def go() -> None:
            try:
                await self.dial(address, timeout_s)
            except PeeringError as err:
                log.warning("stage %d: %s", self.stage, err)
            finally:
                self._dialing.discard(address)

        self._spawn(go(), f"dial-{address}")

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, context) -> None:
        """gRPC handler for an incoming link; runs until that link closes."""
        link = self._new_link(context, f"stage{self.stage}<-peer")
        try:
            hello = await asyncio.wait_for(link.recv(), HELLO_TIMEOUT_S)
        except (LinkClosed, WireError, TimeoutError):
            link.close()
            return
        problem = self._check_hello(hello)
        if problem is None and self.has_live(hello.peer_id):
            problem = f"stage {self.stage} already has a live link to node {hello.peer_id}"
        if problem:
            link.post(ErrorReport(None, "FAILED_PRECONDITION", problem))
            await link.aclose()
            return
        link.name = f"stage{self.stage}<-{hello.peer_id}"
        link.peer_stage, link.peer_id = hello.stage, hello.peer_id
        link.post(self._hello())
        self._attach(link)
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
        side = self.ups if link.peer_stage == self.stage - 1 else self.downs
        old = side.get(link.peer_id)
        if old is not None and old is not link:
            old.close()
        side[link.peer_id] = link
        log.info("stage %d: linked with %s (stage %d)", self.stage, link.peer_id, link.peer_stage)

    # ---- receiving -----------------------------------------------------------------------
    async def _read_loop(self, link: Link) -> None:
        try:
            while True:
                try:
                    msg = await link.recv()  # idle is normal; keepalive pings detect dead peers
                except WireError as err:
                    self.refuse(link, err)
                    continue
                await self.inbox.put((link, msg))
        except LinkClosed as err:
            await self.inbox.put((link, LinkDown(str(err))))

    def refuse(self, link: Link, err: WireError) -> None:
        """Count, log, and tell the peer what we refused; nothing of the message is applied."""
        self.errors[err.code] += 1
        log.warning(
            "stage %d: refused a message from %s: %s (%s)",
            self.stage,
            link.peer_id or f"stage {link.peer_stage}",
            err,
            err.code,
        )
        link.reject(err)
