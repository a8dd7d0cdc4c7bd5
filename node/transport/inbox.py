"""The node's one inbox: every validated message from any link, in arrival order, for the
node's single worker, with what it holds counted per link (messages) and in all (bytes), so the
readers can hold a peer back before the node's memory is the peer's to spend (#10 H5)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from node.wire.messages import held_bytes


class LinkDown:
    """Inbox marker: a link closed."""

    def __init__(self, reason: str):
        self.reason = reason


class LinkUp:
    """Inbox marker: a link to a peer is up (handshake done); a newer one replaces an older."""


class PeerInbox(asyncio.Queue):
    """The node's one inbox, counting what each link has waiting in it (messages) and what all
    of it holds (bytes, as decoded), so a reader can hold a peer back while the worker has
    enough of that peer's messages (in-flight limit) or of everyone's (byte budget)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.queued: Counter = Counter()
        self.bytes = 0
        self._room = asyncio.Event()

    def _put(self, item) -> None:
        super()._put(item)
        self.queued[item[0]] += 1
        self.bytes += held_bytes(item[1])

    def _get(self):
        item = super()._get()
        self.queued[item[0]] -= 1
        self.bytes -= held_bytes(item[1])
        if self.queued[item[0]] <= 0:
            del self.queued[item[0]]
        self._room.set()
        return item

    def full_for(self, link, in_flight: int, budget: int) -> bool:
        """Must `link`'s reader wait? While it has `in_flight` messages waiting, or any while
        the whole inbox is over `budget` bytes: so the inbox never holds much more than the
        budget (one message a link past it), and a peer with nothing waiting is never kept
        out by the others' backlog (a flood from many links cannot starve an honest one)."""
        n = self.queued[link]
        return n >= in_flight or (n > 0 and self.bytes >= budget)

    async def wait_room(self, timeout_s: float) -> None:
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout_s)
