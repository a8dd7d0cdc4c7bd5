"""A stage node: one StageRuntime, driven by the messages on its links to the replicas of the
neighbouring stages, in exact mode.

A step is M microbatches. Stage 0's replicas split the ids among themselves (`split_share`), every
sender picks the next stage's replica by load, and the gradient of each id is counted exactly
once per stage. A stage's step is complete when the STEP_DONE notices from upstream cover all M
ids and nothing is pending; then its replicas sum their gradients with hivemind's averager (a
round is valid only if the ids counted by its members are disjoint and cover the step), all apply
the same update, and move to the next step. With one replica and an fp32 wire this is the
reference trainer's maths (its tests compare to within 1e-5).

Threads: torch runs on one compute thread (FIFO), averaging rounds on another, the event loop only
moves bytes, so streams, keepalives and deadlines stay responsive while a stage computes.
The data path is in `dataflow.py`, failure recovery in `recovery.py`, the DHT in `membership.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from node import checkpoint
from node import device as devices
from node.data import Batches, Corpus
from node.dataflow import DataFlow
from node.errors import NodeFailed
from node.events import EventLog
from node.ledger import StepLedger
from node.membership import Membership
from node.model.resbm import ResBM
from node.node_config import NodeConfig
from node.peering import Neighbours, PeeringError
from node.recovery import Recovery
from node.report import STATUS_EVERY_S, Progress, exit_summary, progress_line
from node.runtime import StageRuntime
from node.stepping import Stepping
from node.swarm.manifest import swarm_fingerprint
from node.swarm.routing import split_share
from node.transport.link import CHUNK_CAP, LinkClosed, LinkSettings
from node.wire.codec import WireError
from node.wire.messages import ErrorReport, Notice, NoticeKind

log = logging.getLogger(__name__)


def link_settings(cfg: NodeConfig) -> LinkSettings:
    max_bytes = int(cfg.max_message_mb * (1 << 20))
    return LinkSettings(
        codec=cfg.wire_codec,
        max_message_bytes=max_bytes,
        chunk_bytes=min(max(max_bytes // 4, 4096), CHUNK_CAP),  # every peer accepts CHUNK_CAP
        min_bandwidth_bps=cfg.min_bandwidth_mbps * 1e6,
        base_timeout_s=cfg.base_timeout_s,
    )


class StageNode(DataFlow, Recovery, Stepping):
    def __init__(self, cfg: NodeConfig, dht=None, averager=None):
        self.cfg, self.k, self.M = cfg, cfg.stage, cfg.microbatches
        self.is_first, self.is_last = cfg.stage == 0, cfg.stage == cfg.model.n_stages - 1
        self.node_id = cfg.node_id or f"n{cfg.stage}-{secrets.token_hex(4)}"
        self.settings = link_settings(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.swarm_data and not cfg.model.needs_tokens(cfg.stage):  # holds no data: `join`
            corpus = Corpus.without_tokens(cfg.swarm_data, "the swarm's data")
        else:
            corpus = Corpus.load(cfg.data)
        self.batches = Batches(corpus, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)  # the whole model from the seed, then keep our stage
        stage = ResBM(cfg.model).stage(cfg.stage)
        dev = devices.resolve(cfg.device)
        devices.configure(dev)
        self.runtime = StageRuntime(
            stage,
            cfg.optim,
            self.batches,
            cfg.microbatches,
            device=dev,
            precision=cfg.precision,
            compile=cfg.compile,
            wire_codec=cfg.wire_codec,
            qat=cfg.qat,
        )
        self.params = list(stage.parameters())
        self.fingerprint = swarm_fingerprint(cfg, corpus.fingerprint)
        self.tensor_shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim)
        self.step = 0
        self.state_lock = threading.Lock()  # the optimizer step vs. a joiner's state download
        if cfg.resume:
            self.step = checkpoint.load_stage(cfg.checkpoint_dir, self.runtime)
        self.resumed_at = self.step if cfg.resume else None  # see Recovery.align_resumed_step
        self.events = EventLog(cfg.events)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.k}-compute")
        self.round_executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.k}-rounds")
        self.errors: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # recomputed, rounds, lost, ...
        self.stopping = asyncio.Event()  # set by SIGINT/SIGTERM, possibly before run()
        self.draining = False
        self._told_leaving = False  # our last averaging round said we leave (or had no peers)
        self.move_to: int | None = None  # the coordinator asked us to serve this stage instead
        self.peers = Neighbours(
            self.k,
            cfg.model.n_stages,
            self.fingerprint,
            self.settings,
            self.tensor_shape,
            cfg.batch_size,
            self.errors,
            self.node_id,
            security=cfg.security,
            # a peer may have a whole step's messages waiting here (plus notices) unthrottled
            limits=cfg.limits.model_copy(
                update={"max_in_flight": max(cfg.limits.max_in_flight, 4 * cfg.microbatches + 16)}
            ),
        )
        self.averager = averager
        self.membership = Membership(self, dht)
        # static pipeline: one replica per stage, in sync by construction
        self.synced = dht is None
        self.group0: list[tuple[str, float]] | None = [(self.node_id, 1.0)] if dht is None else None
        self.leaving: set[str] = set()  # neighbours that announced they drain
        self.compute_s = 0.0
        self.mb_per_s = 0.0  # measured compute throughput, announced in the DHT
        self._compute_mark, self._s_per_mb = 0.0, 0.0
        self.last_loss: float | None = None
        self.metrics = None  # the Prometheus endpoint (node/metrics.py), if ops.metrics_listen
        self.ledger = StepLedger(self.step)
        self.prev_ledger: StepLedger | None = None
        self.early: list = []  # messages for the next step, replayed once we get there
        self._step_t0 = time.perf_counter()
        self._round_fail_since: float | None = None
        self._round_attempts = 0
        self._garbled = False  # fault injection `garbage` fired
        self.joiner_expected_at: int | None = None  # a joiner downloaded our state at this step
        Recovery.__init__(self)
        if averager is not None:
            averager.set_state_provider(self._state_snapshot)

    @property
    def port(self) -> int:
        return self.peers.port

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
            "ready",
            metrics_port=self.metrics.port if self.metrics else None,
            stage=self.k,
            port=self.port,
            step=self.step,
            pid=os.getpid(),
            node=self.node_id,
            maddrs=self.membership.maddrs(),
            device=devices.name(self.runtime.device),
            precision=self.cfg.precision,
        )
        log.info("stage %d (%s) listening on port %d", self.k, self.node_id, self.port)
        await self.membership.start()
        if self.cfg.next:
            await self.peers.dial(self.cfg.next, self.cfg.connect_timeout_s)

    def request_stop(self) -> None:
        """SIGINT/SIGTERM: drain. Finish this step's work (with its averaging round), then go;
        neighbours are told at once so they route nothing new here."""
        log.info("stage %d: stop requested: draining", self.k)
        self.draining = True
        self.stopping.set()

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
            links = self.peers.links()
            sent = sum(sum(lk.bytes_sent.values()) for lk in links)
            ckpt = self.cfg.checkpoint_dir
            stage_file = Path(ckpt or ".") / checkpoint.STAGE_FILE.format(k=self.k)
            ckpt = ckpt if ckpt and stage_file.is_file() else None  # only one that was written
            summary = exit_summary(
                self.k,
                self.step,
                self.cfg.steps,
                code,
                self.stats,
                sent,
                sum(self.errors.values()),
                ckpt,
            )
            (log.info if code == 0 else log.warning)("%s", summary)
            self.events.write(
                "exit",
                stage=self.k,
                node=self.node_id,
                code=code,
                step=self.step,
                errors=dict(self.errors),
                stats=dict(self.stats),
                bytes_forward=sum(lk.bytes_sent["forward"] for lk in links),
                bytes_backward=sum(lk.bytes_sent["backward"] for lk in links),
            )
            self.events.close()
        return code

    async def shutdown(self, clean: bool = True) -> None:
        if clean:  # a crash must look like one: neighbours then recover our work
            await self._say_leaving()
        for link in self.peers.links():
            with contextlib.suppress(LinkClosed, Exception):
                await asyncio.wait_for(link.drain(), 5)
        await self.membership.stop()
        await self.peers.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.round_executor.shutdown(wait=False, cancel_futures=True)
        # only on a clean exit: a node that failed mid-run must not leave a checkpoint newer
        # than its neighbours' (a fixed pipeline resumes from one step; see docs/running.md)
        ckpt = self.cfg.checkpoint_dir and self.step > 0 and not self.runtime.pending
        if clean and ckpt and self.synced:
            checkpoint.save_stage(self.cfg.checkpoint_dir, self.runtime, self.step)
            with contextlib.suppress(TimeoutError):  # for `resbm export --swarm`
                await asyncio.wait_for(self.membership.announce_checkpoint(), 3.0)
        if self.metrics is not None:  # last: scrapes see the drain
            await self.metrics.stop()

    async def _say_leaving(self) -> None:
        if getattr(self, "_said_leaving", False):
            return
        self._said_leaving = True
        for link in self.peers.links():
            with contextlib.suppress(LinkClosed):
                if not link.closed.is_set():
                    link.post(Notice(NoticeKind.leaving, self.step, (), self.node_id))
        with contextlib.suppress(TimeoutError):  # the links already told the neighbours
            await asyncio.wait_for(self.membership.announce(leaving=True), 3.0)

    async def _compute(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.compute_s += time.perf_counter() - t0

    # ---- the worker ----------------------------------------------------------------------
    async def _work(self) -> int:
        await self.membership.initial_sync()
        self._begin_step()
        status_at = time.monotonic() + STATUS_EVERY_S
        last = Progress(time.monotonic(), self.stats["counted"])
        while self.step < self.cfg.steps:
            if self.stopping.is_set():
                await self._say_leaving()  # once
                if self._idle():  # nothing of this step started here: leave now
                    return 0
                if (stage := self._stranded()) is not None:  # this step cannot finish
                    log.warning(
                        "stage %d: leaving without finishing step %d: no replica of stage %d "
                        "is left to finish it with (this stage's replicas redo our share)",
                        self.k,
                        self.step,
                        stage,
                    )
                    return 0
            if self._run_over():
                return 0
            await self._pump()
            if self._complete():
                if await self._finish_step():
                    # leave once the stage's replicas know (stage 0: out of the next split)
                    if self.draining and self._told_leaving:
                        return 0
                    continue
                wait = min(1.0, self.cfg.matchmaking_s)  # the round failed: look again soon
            else:
                wait = 1.0
            item = await self._next(wait)
            while item is not None:  # everything that arrived, before the next round attempt
                await self._handle_safely(*item)
                item = self._next_nowait()
            if time.monotonic() > status_at:
                status_at = time.monotonic() + STATUS_EVERY_S
                log.info("%s", self._progress(last))
                last = Progress(time.monotonic(), self.stats["counted"])
            if self.membership.behind():
                log.warning("stage %d: the stage's replicas moved on without us: resyncing", self.k)
                await self.membership.resync()
        return 0

    async def _handle_safely(self, link, msg) -> None:
        """A peer's message never takes the node down: a failure handling one (a bug, or an
        input no check foresaw) is logged, counted and refused; only our own failures stop us."""
        try:
            await self._handle(link, msg)
        except (NodeFailed, WireError, asyncio.CancelledError):  # WireError: our own output
            raise
        except Exception as err:
            self.errors["internal"] += 1
            log.exception(
                "stage %d: failed to handle %s from %s", self.k, type(msg).__name__, link.peer_id
            )
            mid = getattr(msg, "id", None)
            with contextlib.suppress(LinkClosed):
                link.post(
                    ErrorReport(mid, "INTERNAL", f"could not handle it: {type(err).__name__}")
                )

    async def _next(self, timeout: float):
        try:
            return await asyncio.wait_for(self.peers.inbox.get(), timeout)
        except TimeoutError:
            return None

    def _next_nowait(self):
        try:
            return self.peers.inbox.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def _idle(self) -> bool:
        """Nothing of this step was started here: a draining node may leave at once."""
        L = self.ledger
        queued = self.early or not self.peers.inbox.empty()
        mine = L.share  # stage 0: a share of this step is ours until a round says we leave
        return not (L.counted or self.runtime.pending or L.sent_to or L.came_from or queued or mine)

    def _run_over(self) -> bool:
        """Fixed pipeline (no DHT): when a neighbour stage left and none is left on that side,
        the run is over for everyone, at this step boundary. "Left" is a leaving notice *and* a
        closed link: a draining neighbour first finishes the step it is in, which needs us (a
        crash, with no notice, is waited out: the node may come back from its checkpoint)."""
        if self.membership.dynamic or not self.leaving or self._started():
            return False

        def gone(links: dict) -> bool:
            closed = all(lk.closed.is_set() for lk in links.values())
            return bool(links) and closed and not self.leaving.isdisjoint(links)

        gone_up = not self.is_first and gone(self.peers.ups)
        gone_down = not self.is_last and gone(self.peers.downs)
        if gone_up or gone_down:
            log.info("stage %d: a neighbour stage left; the run ends at step %d", self.k, self.step)
            return True
        return False

    def _stranded(self) -> int | None:
        """A neighbour stage with no replica left (none linked, none online in the DHT): the
        step cannot finish until one joins, so a draining node must not wait for it (found by
        hand: a node the coordinator told to move drained forever). None in a fixed pipeline,
        where a crashed neighbour is waited out (it may come back from its checkpoint)."""
        if not self.membership.dynamic:
            return None
        for side, stage in (("up", self.k - 1), ("down", self.k + 1)):
            exists = 0 <= stage < self.cfg.model.n_stages
            if exists and not self.peers.live(side) and not self.membership.any_online(stage):
                return stage
        return None

    def _started(self) -> bool:
        L = self.ledger
        return bool(L.counted or self.runtime.pending or L.sent_to or L.came_from or L.done_from)

    def _progress(self, last: Progress) -> str:
        """The 30 s line: step, loss, tokens/s, this node's work; what it waits for when
        nothing moved since the last line."""
        counted = self.stats["counted"]
        stuck = counted == last.counted
        return progress_line(
            self.k,
            self.step,
            self.cfg.steps,
            counted,
            self.cfg.batch_size * self.cfg.model.seq_len,
            last,
            time.monotonic(),
            loss=self.last_loss if self.is_last else self.membership.swarm_loss(),
            waiting=self._waiting_for() if stuck else None,
        )

    def _waiting_for(self) -> str:
        L = self.ledger
        if not self.synced:
            return "syncing with the stage's replicas"
        if self.is_first and not self.peers.live("down"):
            return f"paused: no replica of stage {self.k + 1} is linked"
        if not self.is_first and not self.peers.live("up"):
            return f"paused: no replica of stage {self.k - 1} is linked"
        return (
            f"{len(L.counted)} counted here, {len(self.runtime.pending)} pending, "
            f"upstream done {len(L.upstream_done())}/{self.M}"
        )

    # ---- steps ---------------------------------------------------------------------------
    def _begin_step(self) -> None:
        self.prev_ledger, self.ledger = self.ledger, StepLedger(self.step)
        self._step_t0 = time.perf_counter()
        if self.is_first and self.synced and self.group0:
            share = split_share(self.group0, self.M).get(self.node_id, [])
            self.ledger.share, self.ledger.queue = list(share), list(share)
        early, self.early = self.early, []
        if early:  # they were for this step and came first: ahead of what is queued since
            inbox, queued = self.peers.inbox, []
            while not inbox.empty():
                queued.append(inbox.get_nowait())
            for item in early + queued:
                inbox.put_nowait(item)

    def _complete(self) -> bool:
        """This replica's part of the step is done and the whole stage's is too, as far as it
        can tell; the averaging round checks the rest."""
        L = self.ledger
        self._tell_owed_done()  # even mid-step: a neighbour that (re)linked may wait for it
        if self.runtime.pending or self.adoptions_open() or L.stalled:
            return False
        if not self.synced:
            return self.membership.dynamic  # an unsynced replica joins the round with nothing
        if self.is_first:
            done = not L.queue and set(L.share) <= L.counted
        else:
            done = L.upstream_done() == set(range(self.M))
        if done and not self.is_last:
            # again if the set grew: a replica that adopted a dead one's ids tells that too
            ids = set(L.counted if self.is_first else L.upstream_done())
            if ids != L.done_sent:
                L.done_sent, L.done_told = ids, set()
        self._tell_owed_done()
        return done

    def _tell_owed_done(self) -> None:
        """STEP_DONE of this and the previous step to every downstream replica that has not
        heard it: one linked since, or relinked after a cut that may have lost it."""
        for ledger in (self.prev_ledger, self.ledger):
            if ledger is not None and ledger.done_sent and not self.is_last:
                self._tell_done(ledger)

    def _tell_done(self, ledger: StepLedger) -> None:
        ids = tuple(sorted(ledger.done_sent))
        for peer, link in self.peers.live("down").items():
            if peer not in ledger.done_told:
                ledger.done_told.add(peer)
                with contextlib.suppress(LinkClosed):
                    link.post(Notice(NoticeKind.step_done, ledger.step, ids, self.node_id))
