"""Carrying out a stage machine's effects (node/protocol/events.py) with the real parts: links,
hivemind's averager, the DHT, the event log, checkpoints and the chaos mode. Answers (a round's
result, a downloaded state) go back into the machine, and what it says then is carried out
next. Like the daemon that owns it (node/daemon.py), it decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from node import checkpoint
from node.chaos import Chaos
from node.errors import NodeFailed
from node.events import EventLog
from node.membership import Membership
from node.peering import Neighbours
from node.protocol import events as ev
from node.protocol.machine import StageMachine
from node.transport.link import LinkClosed
from node.wire.codec import WireError
from node.wire.messages import Backward, Forward

log = logging.getLogger("node.daemon")


@dataclass
class Carrier:
    machine: StageMachine
    peers: Neighbours
    membership: Membership
    averager: Any  # node.swarm.averaging.StageAverager, or None in a fixed pipeline
    events: EventLog
    chaos: Chaos
    checkpoint_dir: Any
    compute: ThreadPoolExecutor  # the one thread that runs the machine (and torch)
    rounds: ThreadPoolExecutor  # averaging rounds and state downloads
    # a swarm node's start (wall clock): its stage's replicas may share the checkpoint
    # directory, and a later step one saved since is not replaced (checkpoint.save_stage)
    shared_since: float | None = None
    round_task: asyncio.Task | None = None  # overlapped: the round in progress (start_round)

    @property
    def k(self) -> int:
        return self.machine.core.k

    async def on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def feed(self, events: list) -> None:
        """Hand the machine a batch of events (on the compute thread), then carry its effects."""
        await self.carry(await self.on_compute(self.machine.handle, events, time.monotonic()))

    async def carry(self, effects: list) -> None:
        todo = deque(effects)
        while todo:
            e = todo.popleft()
            answer = None
            if isinstance(e, ev.Send):
                self.send(e.peer, self.chaos.outgoing(e.msg, self.machine.state.step))
            elif isinstance(e, ev.Refuse):
                link = self.peers.ups.get(e.peer) or self.peers.downs.get(e.peer)
                if link is not None:
                    self.peers.refuse(link, e.error)
            elif isinstance(e, ev.Average) and self.machine.core.schedule.overlap:
                self.start_round(e)  # its answer comes through the inbox
            elif isinstance(e, ev.Average):
                answer = await self.average(e)
            elif isinstance(e, ev.Resync):
                got = await self.membership.download(self.averager, self.rounds)
                answer = ev.StateLoaded(*(got or (None, None)))
            elif isinstance(e, ev.Announce):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.membership.announce(e.leaving), 3.0)
            elif isinstance(e, ev.ShareState) and self.averager is not None:
                self.averager.share_state(e.allow)
            elif isinstance(e, ev.SaveCheckpoint):
                try:
                    saved = await self.on_compute(self.save, e.step)
                except checkpoint.NotFinite as err:  # the weights are lost; the checkpoint
                    raise NodeFailed(f"{err}: kept the last good checkpoint") from None  # not
                if saved:  # not when a replica sharing the directory saved a later step
                    await self.membership.announce_checkpoint()
            elif isinstance(e, ev.Emit):
                self.events.write(e.kind, **self.with_links(e))
            elif isinstance(e, ev.Trace):
                self.chaos.reached(e.phase, e.step)
            if answer is not None:
                todo.extendleft(reversed(await self.on_compute(self.answer, answer)))

    async def average(self, e: ev.Average) -> ev.RoundDone:
        """One averaging round (hivemind's, on the rounds thread; `e.timeout_s` bounds it)."""
        t0, loop = time.perf_counter(), asyncio.get_running_loop()
        args = (self.averager.round, e.grads, e.loss_sum, e.info, e.timeout_s)
        result = await loop.run_in_executor(self.rounds, *args)
        return ev.RoundDone(result, time.perf_counter() - t0)

    def start_round(self, e: ev.Average) -> None:
        """Overlapped: the round runs beside the next step's early microbatches, which the
        machine takes meanwhile (machine._ahead_in_round); its RoundDone joins the inbox, in
        order with what the links delivered. One round at a time: the machine asks for the
        next only after this one's answer. Owned here: stop_round cancels it."""

        async def run() -> None:
            done = await self.average(e)
            self.peers.inbox.put_nowait((None, done))

        if self.round_task is not None and not self.round_task.done():
            raise RuntimeError("an averaging round is already running")
        self.round_task = asyncio.ensure_future(run())

    def check_round(self) -> None:
        """Raise what the round in progress raised (a bug, as it would inline): the machine
        would otherwise wait for its answer for ever."""
        task = self.round_task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            raise task.exception()

    async def stop_round(self) -> None:
        task, self.round_task = self.round_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def answer(self, answer) -> list:
        return self.machine.handle([answer], time.monotonic())

    def save(self, step: int) -> bool:
        with self.machine.core.lock:
            runtime = self.machine.core.runtime
            path = checkpoint.save_stage(self.checkpoint_dir, runtime, step, self.shared_since)
        return path is not None

    def send(self, peer: str, msg) -> None:
        link = self.peers.ups.get(peer) or self.peers.downs.get(peer)
        errors = self.machine.state.errors
        try:
            if link is None:
                raise LinkClosed("no link")
            link.post(msg)
            tensor = msg.z if isinstance(msg, Forward) else getattr(msg, "grad", None)
            if tensor is not None and isinstance(msg, (Forward, Backward)):
                side = "forward" if isinstance(msg, Forward) else "backward"  # node/guard.py
                self.peers.guard.sent.record(peer, side, msg.id.step, msg.id.index, tensor)
        except LinkClosed as err:
            errors["unsent"] += 1
            log.info("stage %d: could not send %s: %s", self.k, type(msg).__name__, err)
        except WireError as err:  # our own output is not sendable (non-finite): drop, log
            errors["unsendable"] += 1
            log.error("stage %d: not sending %s: %s", self.k, type(msg).__name__, err)

    def with_links(self, e: ev.Emit) -> dict:
        """The `step` event, with the links' byte and time counters."""
        if e.kind != "step":
            return e.fields
        links = self.peers.counted()
        return {
            **e.fields,
            "bytes_forward": sum(lk.bytes_sent["forward"] for lk in links),
            "bytes_backward": sum(lk.bytes_sent["backward"] for lk in links),
            "codec_s": sum(lk.codec_seconds for lk in links),
            "transport_s": sum(lk.send_seconds for lk in links),
        }
