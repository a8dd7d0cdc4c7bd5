"""A stage node's driver: it feeds the stage machine (node/protocol/) events from the links, the
averager and the DHT, and carries out the effects the machine returns. It decides nothing.

Threads: the machine runs on the one compute thread (torch is called from there, FIFO), the
averaging rounds and state downloads on another, and the event loop only moves bytes, so
streams, keepalives and deadlines stay responsive while a stage computes. The machine's state
is changed only by `handle` (on the compute thread) and, before it starts, by `place`; the
loop reads it for announcements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.identity import Identity
from common.process import report_if_stuck
from node import checkpoint, peering
from node import device as devices
from node.chaos import Chaos
from node.data import Batches, Corpus
from node.effects import Carrier
from node.errors import NodeFailed
from node.events import EventLog
from node.membership import Membership, Status
from node.model.resbm import ResBM
from node.node_config import NodeConfig
from node.peering import Neighbours, PeeringError, link_settings
from node.protocol import events as ev
from node.protocol.machine import StageMachine
from node.protocol.recovery import BANNED_REASON
from node.protocol.state import StageState
from node.protocol.view import SwarmView
from node.report import STATUS_EVERY_S, Progress, exit_summary, progress_line
from node.runtime import StageRuntime
from node.startup import initial_sync
from node.swarm.manifest import swarm_fingerprint
from node.transport.link import LinkClosed
from node.wire.codec import WireError
from node.wire.messages import ErrorReport

log = logging.getLogger(__name__)

# after a stop, a loop (or shutdown) that has not turned for this long is reported with where
# it waits (a long state download or round, or a hang: common/process.py)
STUCK_AFTER_S = 10.0


class StageNode:
    def __init__(self, cfg: NodeConfig, dht=None, averager=None, identity: Identity | None = None):
        self.cfg, self.k = cfg, cfg.stage
        self.identity = identity or Identity.for_node(cfg.identity_file, cfg.node_id)
        self.node_id = self.identity.node_id  # derived from the key (node/handshake.py)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.swarm_data and not cfg.model.needs_tokens(cfg.stage):  # holds no data: `join`
            corpus = Corpus.without_tokens(cfg.swarm_data, "the swarm's data")
        else:
            corpus = Corpus.load(cfg.data)
        batches = Batches(corpus, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)  # the whole model from the seed, then keep our stage
        dev = devices.resolve(cfg.device)
        devices.configure(dev)
        self.runtime = StageRuntime(
            ResBM(cfg.model).stage(cfg.stage), cfg.optim, batches, cfg.microbatches,
            device=dev, precision=cfg.precision, compile=cfg.compile,
            wire_codec=cfg.wire_codec, qat=cfg.qat, overlap=cfg.overlap_mbs,
            predict=cfg.prediction,
        )  # fmt: skip
        self.fingerprint = swarm_fingerprint(cfg, corpus.fingerprint)
        state = StageState(self.node_id, cfg.stage == 0, cfg.microbatches, synced=dht is None)
        if dht is None:  # static pipeline: one replica per stage, in sync by construction
            state.group0 = [(self.node_id, 1.0)]
        if cfg.resume:
            state.step = checkpoint.load_stage(cfg.checkpoint_dir, self.runtime)
            state.resumed_at = state.step
        n = cfg.model.n_stages
        view = SwarmView(cfg.stage, n, True) if dht else SwarmView.fixed(cfg.stage, n)
        self.machine = StageMachine(cfg, self.runtime, batches, state, view, averager is not None)
        self.events = EventLog(cfg.events)
        self.chaos = Chaos(cfg, self.events, self.node_id)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.k}-compute")
        self.round_executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.k}-rounds")
        self.stopping = asyncio.Event()  # set by SIGINT/SIGTERM, possibly before run()
        self._stop_sent = False
        self._turned_at: float | None = None  # the loop's last turn (_work, shutdown)
        self._stuck_watch: asyncio.Task | None = None
        self.move_to: int | None = None  # the coordinator asked us to serve this stage instead
        self.peers = Neighbours(
            self.k, n, self.fingerprint, link_settings(cfg),
            (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim), cfg.batch_size,
            state.errors, self.identity, security=cfg.security,
            # a peer may have a whole step's messages waiting here (plus notices) unthrottled
            limits=cfg.limits.model_copy(
                update={"max_in_flight": max(cfg.limits.max_in_flight, 4 * cfg.microbatches + 16)}
            ),
        )  # fmt: skip
        self.peers.step_filter = self.machine.refuses_step  # refused before decoding
        self.averager = averager
        self.membership = Membership(
            cfg, dht, self.peers, self.node_id, self.fingerprint, self._status,
            lambda p: self.machine.core.presumed_dead(p), self._move,
            max_state_bytes=state_bytes(self.runtime),
            # its parameters' tensors, and at most three optimizer tensors each
            max_tensors=4 * len(list(self.runtime.stage.parameters())) + 16,
        )  # fmt: skip
        self.metrics = None  # the Prometheus endpoint (node/metrics.py), if ops.metrics_listen
        if averager is not None:
            averager.set_state_provider(self.machine.snapshot)
        self.carrier = Carrier(
            self.machine, self.peers, self.membership, averager, self.events, self.chaos,
            cfg.checkpoint_dir, self.executor, self.round_executor,
            time.time() if self.membership.dynamic else None,
        )  # fmt: skip

    # what node/metrics.py, the status line and tests read: the machine's state
    port = property(lambda self: self.peers.port)
    state = property(lambda self: self.machine.state)
    step = property(lambda self: self.state.step)
    synced = property(lambda self: self.state.synced)
    ledger = property(lambda self: self.state.ledger)
    last_loss = property(lambda self: self.state.last_loss)
    mb_per_s = property(lambda self: self.state.mb_per_s)
    compute_s = property(lambda self: self.state.compute_s)
    stats = property(lambda self: self.state.stats)
    errors = property(lambda self: self.state.errors)

    def _status(self) -> Status:
        s, load = self.state, len(self.runtime.pending)
        leaving = s.draining or s.said_leaving  # a finished node lingers as draining
        averager = self.averager.address if self.averager is not None else None
        return Status(
            s.step, s.synced, leaving, s.mb_per_s, load, s.last_loss, list(s.vouches), averager
        )

    def _move(self, stage: int) -> None:
        self.events.write("moving", stage=self.k, node=self.node_id, to_stage=stage)
        self.move_to = stage
        self.request_stop()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.reachable or self.membership.dynamic is False:
            await self.peers.listen(self.cfg.listen)
        else:  # behind NAT: nobody could dial in; every link is one we open (membership)
            log.info("stage %d: not reachable (--no-reachable): dialing out only", self.k)
        if self.cfg.ops.metrics_listen:
            from node.metrics import NodeMetrics

            self.metrics = NodeMetrics(self)
            await self.metrics.start(self.cfg.ops.metrics_listen)
        self.events.write(
            "ready", metrics_port=self.metrics.port if self.metrics else None, stage=self.k,
            port=self.port, step=self.step, pid=os.getpid(), node=self.node_id,
            maddrs=self.membership.maddrs(), device=devices.name(self.runtime.device),
            precision=self.cfg.precision,
        )  # fmt: skip
        log.info("stage %d (%s) listening on port %d", self.k, self.node_id, self.port)
        await self.membership.start()
        if self.cfg.next:
            await self.peers.dial(self.cfg.next, self.cfg.connect_timeout_s)

    def request_stop(self) -> None:
        """SIGINT/SIGTERM: drain (the machine finishes this step's work, then leaves)."""
        log.info("stage %d: stop requested: draining", self.k)
        self.stopping.set()
        try:
            asyncio.get_running_loop()  # the signal handler's
        except RuntimeError:  # called outside the loop: nothing to watch with
            return
        if self._stuck_watch is None:  # owned: run() cancels it once shut down
            what = f"stage {self.k}: a stop was requested"
            self._stuck_watch = asyncio.ensure_future(
                report_if_stuck(lambda: self._turned_at, STUCK_AFTER_S, log, what)
            )

    async def run(self) -> int:
        code = 1
        try:
            starting = asyncio.ensure_future(self.start())
            stopped = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not starting.done():  # a stop during start-up (e.g. while dialing): clean exit
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                code = 0
            else:
                starting.result()
                code = await self._work()
        # a WireError that reaches here is about our own output (non-finite values to send)
        except (NodeFailed, PeeringError, WireError) as err:
            log.error("stage %d: %s", self.k, err)
            self.events.write("error", stage=self.k, message=str(err))
        except Exception as err:
            log.exception("stage %d: unexpected failure", self.k)
            self.events.write("error", stage=self.k, message=repr(err))
        finally:
            await self.shutdown(clean=code == 0)
            if self._stuck_watch is not None:
                self._stuck_watch.cancel()
            self._log_exit(code)
        return code

    def _log_exit(self, code: int) -> None:
        links, ckpt = self.peers.counted(), self.cfg.checkpoint_dir
        sent = sum(sum(lk.bytes_sent.values()) for lk in links)
        stage_file = Path(ckpt or ".") / checkpoint.STAGE_FILE.format(k=self.k)
        ckpt = ckpt if ckpt and stage_file.is_file() else None  # only one that was written
        summary = exit_summary(
            self.k, self.step, self.cfg.steps, code, self.stats, sent,
            sum(self.errors.values()), ckpt,
        )  # fmt: skip
        (log.info if code == 0 else log.warning)("%s", summary)
        self.events.write(
            "exit", stage=self.k, node=self.node_id, code=code, step=self.step,
            errors=dict(self.errors), stats=dict(self.stats),
            bytes_forward=sum(lk.bytes_sent["forward"] for lk in links),
            bytes_backward=sum(lk.bytes_sent["backward"] for lk in links),
        )  # fmt: skip
        self.events.close()

    async def shutdown(self, clean: bool = True) -> None:
        self._turned_at = time.monotonic()  # a shutdown that hangs is reported too
        if clean:  # a crash must look like one: neighbours then recover our work
            await self.carrier.carry(self.machine.leaving_effects(time.monotonic()))
        for link in self.peers.links():
            with contextlib.suppress(LinkClosed, Exception):
                await asyncio.wait_for(link.drain(), 5)
        await self.carrier.stop_round()
        await self.membership.stop()
        await self.peers.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.round_executor.shutdown(wait=False, cancel_futures=True)
        # only on a clean exit: a node that failed mid-run must not leave a checkpoint newer
        # than its neighbours' (a fixed pipeline resumes from one step; see docs/running.md)
        # (overlapped: the next step's microbatches begun early are dropped, not mid-step work)
        busy = [
            m for m in self.runtime.pending if m.step < self.step or not self.runtime.is_early(m)
        ]
        ckpt = self.cfg.checkpoint_dir and self.step > 0 and not busy
        if clean and ckpt and self.synced:
            try:  # False: a replica sharing the directory saved a later step (not announced)
                saved = self.carrier.save(self.step)  # (the compute thread is shut down)
            except checkpoint.NotFinite as err:  # the last good one stays, unannounced
                log.error("stage %d: not saved: %s", self.k, err)
            else:
                if saved:
                    with contextlib.suppress(TimeoutError):  # for `resbm export --swarm`
                        await asyncio.wait_for(self.membership.announce_checkpoint(), 3.0)
        if self.metrics is not None:  # last: scrapes see the drain
            await self.metrics.stop()

    # ---- the loop: events in, effects out -----------------------------------------------
    async def _on_compute(self, fn, *args):
        return await self.carrier.on_compute(fn, *args)

    async def _work(self) -> int:
        await initial_sync(self.carrier, self.cfg.adopt_wait_s, self.stopping)
        await self.carrier.carry(await self._on_compute(self.machine.start, time.monotonic()))
        status_at, seen = time.monotonic() + STATUS_EVERY_S, -1
        last = Progress(time.monotonic(), self.stats["counted"])
        while self.machine.exit is None:
            self._turned_at = time.monotonic()
            more = self.machine.more  # a turn left work: go on at once, with what came
            # (nothing new while events wait in the machine: the inbox's bounds hold then)
            backlogged = self.machine.backlogged
            batch = [] if backlogged else await self._next_batch(self.machine.wake_after())
            if self.stopping.is_set() and not self._stop_sent:
                self._stop_sent = True
                batch.append(ev.Stop())
            if self.membership.version != seen:
                seen = self.membership.version
                batch.insert(0, ev.View(dict(self.membership.records)))
            await self.carrier.feed(batch if more else batch or [ev.Tick()])
            self.carrier.check_round()
            if time.monotonic() > status_at:
                status_at = time.monotonic() + STATUS_EVERY_S
                log.info("%s", self._progress(last))
                last = Progress(time.monotonic(), self.stats["counted"])
        exit_ = self.machine.exit
        if exit_.code:
            raise NodeFailed(exit_.reason)
        return 0

    async def _next_batch(self, timeout: float) -> list:
        """Everything the links delivered, waiting up to `timeout` for the first of it."""
        inbox, items = self.peers.inbox, []
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                items.append(await asyncio.wait_for(inbox.get(), timeout))
        while not inbox.empty():
            items.append(inbox.get_nowait())
        return [e for e in (self._event(link, m) for link, m in items) if e is not None]

    def _event(self, link, msg):
        if link is None:  # the carrier's own answer (an averaging round's: start_round)
            return msg
        side = self.peers.side_of(link)
        if isinstance(msg, peering.LinkUp):
            return ev.LinkUp(link.peer_id, side, link.serial)
        if isinstance(msg, peering.LinkDown):
            banned = self.peers.guard.banned(link.peer_id) is not None
            reason = f"{BANNED_REASON}: {msg.reason}" if banned else msg.reason
            return ev.LinkDown(link.peer_id, side, link.serial, reason)
        if self.peers.guard.banned(link.peer_id) is not None:
            return None  # queued before its ban: nothing a banned peer sent is used
        if isinstance(msg, ErrorReport) and self.peers.guard.is_ban_notice(msg):
            self.errors["banned_by_peer"] += 1
            self.peers.guard.judge_ban(link.peer_id, msg, self.k)  # raises if we were broken
            return None
        return ev.Received(link.peer_id, side, msg)

    def _progress(self, last: Progress) -> str:
        """The 30 s line: step, loss, tokens/s, this node's work; what it waits for when
        nothing moved since the last line."""
        counted = self.stats["counted"]
        is_last = self.k == self.cfg.model.n_stages - 1
        return progress_line(
            self.k, self.step, self.cfg.steps, counted,
            self.cfg.batch_size * self.cfg.model.seq_len, last, time.monotonic(),
            loss=self.last_loss if is_last else self.machine.view.swarm_loss(),
            waiting=self.machine.waiting_for() if counted == last.counted else None,
        )  # fmt: skip


def state_bytes(runtime) -> int:
    """The most a replica's state may take on the wire: its weights and at most two optimizer
    tensors each, in fp32, and some metadata (a larger download is refused: #10 C2)."""
    return 16 * sum(p.numel() for p in runtime.stage.parameters()) + (4 << 20)
