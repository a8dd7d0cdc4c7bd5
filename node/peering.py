"""A node's neighbours: the links to the stages before and after it, and what arrives on them.

Links are symmetric: this node dials the next stage (`--next`) and accepts whoever dials it; the
Hello exchanged first says which neighbour a link leads to, and a neighbour whose swarm config
differs is refused with a reason. Every validated message from either link lands in one inbox,
in arrival order, for the node's single worker to handle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass

from node.node_config import NodeConfig
from node.version import VERSION
from node.transport.link import Link, LinkClosed, LinkSettings
from node.transport.server import dial, start_server
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


def swarm_fingerprint(cfg: NodeConfig, corpus_fp: str) -> str:
    """Everything two stages must agree on to train one model together."""
    blob = json.dumps(
        {
            "model": cfg.model.model_dump(),
            "optim": cfg.optim.model_dump(),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "microbatches": cfg.microbatches,
            "corpus": corpus_fp,
            "codec": cfg.wire_codec.value,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Neighbours:
    stage: int
    n_stages: int
    fingerprint: str
    settings: LinkSettings
    tensor_shape: tuple[int, int, int]
    batch_size: int
    errors: Counter

    def __post_init__(self) -> None:
        self.up: Link | None = None
        self.down: Link | None = None
        self.port = 0
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.down_ready = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._channels: list = []
        self._server = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def listen(self, address: str) -> int:
        self._server, self.port = await start_server(address, self._accept, self.settings)
        return self.port

    async def close(self) -> None:
        for link in (self.down, self.up):
            if link is not None:
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
        return [lk for lk in (self.up, self.down) if lk is not None]

    # ---- handshake -----------------------------------------------------------------------
    def _hello(self) -> Hello:
        return Hello(self.stage, self.fingerprint, f"stage{self.stage}:{self.port}", VERSION)

    def _check_hello(self, msg) -> str | None:
        if not isinstance(msg, Hello):
            return f"expected a Hello first, got {type(msg).__name__}"
        if msg.model_fingerprint != self.fingerprint:
            return (
                f"swarm config mismatch: peer stage {msg.stage} has {msg.model_fingerprint}, "
                f"stage {self.stage} has {self.fingerprint} (model, optimizer, seed, batch, "
                "microbatches, corpus and wire codec must all match)"
            )
        if msg.stage not in (self.stage - 1, self.stage + 1) or msg.stage >= self.n_stages:
            return f"stage {msg.stage} is not a neighbour of stage {self.stage}"
        return None

    def _new_link(self, stream, name: str) -> Link:
        link = Link(stream, self.settings, self.tensor_shape, self.batch_size, name)
        link.start()
        return link

    async def dial(self, address: str, timeout_s: float) -> None:
        """Open the link to the next stage, retrying until it answers or `timeout_s` passes."""
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
                break
            except (LinkClosed, WireError, TimeoutError) as err:
                link.close()
                await channel.close()
                if loop.time() > deadline:
                    raise PeeringError(
                        f"cannot reach the next stage at {address} within {timeout_s:.0f}s: {err}"
                    ) from None
                await asyncio.sleep(0.5)
        self._channels.append(channel)
        link.peer_stage = reply.stage
        self._attach(link)
        task = asyncio.create_task(self._read_loop(link), name=f"read-{link.name}")
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
        role = None if problem else ("up" if hello.stage == self.stage - 1 else "down")
        current = getattr(self, role) if role else None
        if role and current is not None and not current.closed.is_set():
            problem = f"stage {self.stage} already has a live link to stage {hello.stage}"
        if problem:
            link.post(ErrorReport(None, "FAILED_PRECONDITION", problem))
            await link.aclose()
            return
        link.name, link.peer_stage = f"stage{self.stage}<-stage{hello.stage}", hello.stage
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
        if link.peer_stage == self.stage - 1:
            self.up = link
        else:
            self.down = link
            self.down_ready.set()
        log.info("stage %d: linked with stage %d", self.stage, link.peer_stage)

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
            "stage %d: refused a message from stage %s: %s (%s)",
            self.stage,
            link.peer_stage,
            err,
            err.code,
        )
        link.reject(err)
