"""A stage node: one StageRuntime, driven by the messages on its links to the neighbour stages.

Exact mode (the only mode today): within a step, stage 0 forwards microbatches 0..M-1 (up to M in
flight) and every stage processes backwards in microbatch-id order; when a stage has done all M
backwards it steps its own optimizer, before it touches anything of the next step. That is the
reference trainer's maths, so an fp32 wire reproduces its losses bit for bit.

Threads: torch runs on one compute thread (FIFO), the event loop only moves bytes, so streams,
keepalives and deadlines stay responsive while a stage computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from node import checkpoint
from node.data import Batches, Corpus, DataMismatchError, Microbatch, MicrobatchId
from node.events import EventLog
from node.model.resbm import ResBM
from node.node_config import NodeConfig
from node.peering import LinkDown, Neighbours, PeeringError, swarm_fingerprint
from node.runtime import StageRuntime, UnknownMicrobatchError
from node.transport.link import Link, LinkClosed, LinkSettings
from node.wire.codec import WireError
from node.wire.messages import Backward, Done, ErrorReport, Forward, MessageError

log = logging.getLogger(__name__)


def link_settings(cfg: NodeConfig) -> LinkSettings:
    max_bytes = int(cfg.max_message_mb * (1 << 20))
    return LinkSettings(
        codec=cfg.wire_codec,
        max_message_bytes=max_bytes,
        chunk_bytes=max(max_bytes // 4, 4096),
        min_bandwidth_bps=cfg.min_bandwidth_mbps * 1e6,
        base_timeout_s=cfg.base_timeout_s,
    )


class NodeFailed(RuntimeError):
    """The run cannot go on (a neighbour left, a step timed out); the message says why."""


class StageNode:
    def __init__(self, cfg: NodeConfig):
        self.cfg, self.k, self.M = cfg, cfg.stage, cfg.microbatches
        self.is_first, self.is_last = cfg.stage == 0, cfg.stage == cfg.model.n_stages - 1
        self.settings = link_settings(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        corpus = Corpus.load(cfg.data)
        self.batches = Batches(corpus, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)  # the whole model from the seed, then keep our stage
        stage = ResBM(cfg.model).stage(cfg.stage)
        self.runtime = StageRuntime(stage, cfg.optim, self.batches, cfg.microbatches)
        self.fingerprint = swarm_fingerprint(cfg, corpus.fingerprint)
        shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim)
        self.tensor_shape = shape
        self.step = 0
        if cfg.resume:
            self.step = checkpoint.load_stage(cfg.checkpoint_dir, self.runtime)
        self.events = EventLog(cfg.events)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.k}-compute")
        self.errors: Counter[str] = Counter()
        self.stopping = asyncio.Event()  # set by SIGINT/SIGTERM, possibly before run()
        self.peers = Neighbours(
            self.k,
            cfg.model.n_stages,
            self.fingerprint,
            self.settings,
            shape,
            cfg.batch_size,
            self.errors,
        )
        self.compute_s = 0.0
        self._reset_step_state()

    @property
    def up(self) -> Link | None:
        return self.peers.up

    @property
    def down(self) -> Link | None:
        return self.peers.down

    @property
    def port(self) -> int:
        return self.peers.port

    def _reset_step_state(self) -> None:
        self._next_backward = 0  # backwards are applied in id order
        self._grads: dict[int, torch.Tensor] = {}
        self._received: set[int] = set()
        # what a replay of this step would need (#4): the z and the dL/dz we were sent
        self.kept_inputs: dict[MicrobatchId, Forward] = {}
        self.kept_grads: dict[MicrobatchId, torch.Tensor] = {}
        self._step_t0 = time.perf_counter()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.peers.listen(self.cfg.listen)
        self.events.write("ready", stage=self.k, port=self.port, step=self.step, pid=os.getpid())
        log.info("stage %d listening on port %d", self.k, self.port)
        if self.cfg.next:
            await self.peers.dial(self.cfg.next, self.cfg.connect_timeout_s)

    def request_stop(self) -> None:
        """SIGINT/SIGTERM: stage 0 finishes its step and ends the run; others abort cleanly."""
        log.info("stage %d: stop requested", self.k)
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
                code = await (self._drive() if self.is_first else self._serve())
        # a WireError that reaches here is about our own output (non-finite values to send)
        except (NodeFailed, PeeringError, WireError) as err:
            log.error("stage %d: %s", self.k, err)
            self.events.write("error", stage=self.k, message=str(err))
        except Exception as err:
            log.exception("stage %d: unexpected failure", self.k)
            self.events.write("error", stage=self.k, message=repr(err))
        finally:
            await self.shutdown()
            links = self.peers.links()
            self.events.write(
                "exit",
                stage=self.k,
                code=code,
                step=self.step,
                errors=dict(self.errors),
                bytes_forward=sum(lk.bytes_sent["forward"] for lk in links),
                bytes_backward=sum(lk.bytes_sent["backward"] for lk in links),
            )
            self.events.close()
        return code

    async def shutdown(self) -> None:
        await self.peers.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.cfg.checkpoint_dir and self.step > 0 and not self.runtime.pending:
            checkpoint.save_stage(self.cfg.checkpoint_dir, self.runtime, self.step)

    async def _next(self):
        """Next inbox item, or None once a stop is requested."""
        get = asyncio.ensure_future(self.peers.inbox.get())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not get.done():
                get.cancel()
        return get.result() if get.done() and not get.cancelled() else None

    def _send(self, link: Link | None, msg) -> None:
        """Post to a neighbour; a neighbour that is gone costs this message, not the node."""
        try:
            if link is None:
                raise LinkClosed("no link")
            link.post(msg)
        except LinkClosed as err:
            self.errors["unsent"] += 1
            log.warning(
                "stage %d: could not send %s for %s: %s",
                self.k,
                type(msg).__name__,
                getattr(msg, "id", "-"),
                err,
            )

    async def _compute(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.compute_s += time.perf_counter() - t0

    # ---- stage 0: drive the steps ----------------------------------------------------------
    async def _drive(self) -> int:
        # dialed at start, or (behind NAT) the next stage dials us
        waiter = asyncio.ensure_future(self.peers.down_ready.wait())
        stopper = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        if self.down is None:
            return 0
        limit = min(self.M, self.cfg.max_in_flight or self.cfg.model.n_stages)
        while self.step < self.cfg.steps and not self.stopping.is_set():
            step = self.step
            for i in range(self.M):
                while i - self._next_backward >= limit:  # 1F1B: take a backward first
                    await self._handle_next(step)
                mb = self.batches.microbatch(step, i)
                z = await self._compute(self.runtime.forward, mb)
                if self.down is None or self.down.closed.is_set():
                    raise NodeFailed(f"the link to stage {self.k + 1} closed mid-run (step {step})")
                self.down.post(Forward(mb.id, z, mb.offsets, mb.fingerprint))
            while self.step == step:
                await self._handle_next(step)
        if self.down is not None and not self.down.closed.is_set():
            self.down.post(Done(self.step))
            with contextlib.suppress(LinkClosed):
                await self.down.drain()
        return 0

    async def _handle_next(self, step: int) -> None:
        # a stop request does not interrupt a step: its in-flight work is finished first
        # deadline: moving the step's tensors at the minimum bandwidth, plus the other stages'
        # compute, so a slow link or a slow CPU is not mistaken for a dead peer
        timeout = self.settings.timeout_for(self._step_bytes()) + self.cfg.compute_timeout_s
        try:
            link, msg = await asyncio.wait_for(self.peers.inbox.get(), timeout)
        except TimeoutError:
            raise NodeFailed(
                f"step {step}: no gradient for microbatch {self._next_backward} from "
                f"stage 1 within {timeout:.0f}s"
            ) from None
        await self._handle(link, msg)

    def _step_bytes(self) -> int:
        return 2 * self.M * self.tensor_shape[0] * self.tensor_shape[1] * self.tensor_shape[2] * 4

    # ---- stages 1..S-1: serve ------------------------------------------------------------
    async def _serve(self) -> int:
        while True:
            item = await self._next()
            if item is None:
                return 0  # stop requested: abort the step in flight, deterministically
            link, msg = item
            if isinstance(msg, Done):
                if link is not self.up:
                    continue
                if self.down is not None:
                    self._send(self.down, Done(msg.steps))
                    with contextlib.suppress(LinkClosed):
                        await self.down.drain()
                return 0
            await self._handle(link, msg)

    # ---- message handling (all stages) ---------------------------------------------------
    async def _handle(self, link: Link, msg) -> None:
        if isinstance(msg, Forward):
            await self._on_forward(link, msg)
        elif isinstance(msg, Backward):
            await self._on_backward(link, msg)
        elif isinstance(msg, ErrorReport):
            self.errors["peer_" + msg.code] += 1
            log.warning(
                "stage %d: stage %s reports %s: %s", self.k, link.peer_stage, msg.code, msg.message
            )
            ours = msg.id is not None and msg.id.step == self.step
            if ours and self.is_first:  # a microbatch of this step was refused downstream
                raise NodeFailed(
                    f"stage {link.peer_stage} refused microbatch "
                    f"({msg.id.step}, {msg.id.index}): {msg.code}: {msg.message}"
                )
            if ours and link is self.down:  # pass it on towards stage 0
                self._send(self.up, msg)
        elif isinstance(msg, LinkDown):
            if link is self.down and (self.is_first or self.runtime.pending):
                raise NodeFailed(f"the link to stage {self.k + 1} closed mid-run: {msg.reason}")
            log.info("stage %d: link to stage %s closed: %s", self.k, link.peer_stage, msg.reason)

    async def _on_forward(self, link: Link, msg: Forward) -> None:
        mid = msg.id
        problem = None
        if self.is_first or link is not self.up:
            problem = ("INVALID_ARGUMENT", "forward messages must come from the upstream stage")
        elif msg.z is None:
            problem = ("INVALID_ARGUMENT", "forward without a boundary tensor")
        elif not self.is_last and (self.down is None or self.down.closed.is_set()):
            problem = ("UNAVAILABLE", f"stage {self.k} has no live link to stage {self.k + 1}")
        elif mid.step != self.step:
            problem = ("FAILED_PRECONDITION", f"this stage is at step {self.step}")
        elif not 0 <= mid.index < self.M:
            problem = ("INVALID_ARGUMENT", f"microbatch index outside 0..{self.M - 1}")
        elif mid.index in self._received:
            problem = ("ALREADY_EXISTS", "this microbatch was already forwarded")
        mb = Microbatch(mid, msg.offsets, msg.data_fingerprint)
        if problem is None:
            try:
                self.batches.check(mb)
            except DataMismatchError as err:
                problem = ("FAILED_PRECONDITION", str(err))
            except ValueError as err:
                problem = ("INVALID_ARGUMENT", str(err))
        if problem is not None:
            self.peers.refuse(link, MessageError(mid, *problem))
            return
        self._received.add(mid.index)
        self.kept_inputs[mid] = msg
        if self.is_last:
            result = await self._compute(self.runtime.forward_backward, mb, msg.z)
            self._send(self.up, Backward(mid, result.grad_input))
            if len(self._received) == self.M:
                await self._finish_step()
        else:
            z = await self._compute(self.runtime.forward, mb, msg.z)
            self._send(self.down, Forward(mid, z, msg.offsets, msg.data_fingerprint))

    async def _on_backward(self, link: Link, msg: Backward) -> None:
        mid = msg.id
        if self.is_last or link is not self.down:
            self.peers.refuse(
                link,
                MessageError(
                    mid, "INVALID_ARGUMENT", "backward messages must come from the downstream stage"
                ),
            )
            return
        if mid not in self.runtime.pending or mid.index in self._grads:
            self.peers.refuse(
                link,
                MessageError(
                    mid, "NOT_FOUND", f"no forward of this microbatch is pending on stage {self.k}"
                ),
            )
            return
        self._grads[mid.index] = msg.grad
        self.kept_grads[mid] = msg.grad
        while self._next_backward in self._grads:  # apply in id order: exact sums
            i = self._next_backward
            grad = self._grads.pop(i)
            try:
                grad_in = await self._compute(
                    self.runtime.backward, MicrobatchId(self.step, i), grad
                )
            except (UnknownMicrobatchError, ValueError) as err:
                self.peers.refuse(link, MessageError(mid, "INVALID_ARGUMENT", str(err)))
                return
            if grad_in is not None:
                self._send(self.up, Backward(MicrobatchId(self.step, i), grad_in))
            self._next_backward += 1
        if self._next_backward == self.M:
            await self._finish_step()

    async def _finish_step(self) -> None:
        stats = await self._compute(self.runtime.step, self.step)
        links = self.peers.links()
        event = {
            "stage": self.k,
            "step": self.step,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "bytes_forward": sum(lk.bytes_sent["forward"] for lk in links),
            "bytes_backward": sum(lk.bytes_sent["backward"] for lk in links),
            "compute_s": self.compute_s,
            "codec_s": sum(lk.codec_seconds for lk in links),
            "transport_s": sum(lk.send_seconds for lk in links),
            "step_wall_s": time.perf_counter() - self._step_t0,
        }
        if self.is_last:
            event["loss"] = sum(stats.losses) / len(stats.losses)
        self.events.write("step", **event)
        self.step += 1
        self._reset_step_state()
        every = self.cfg.checkpoint_every
        if self.cfg.checkpoint_dir and every and self.step % every == 0:
            await self._compute(
                checkpoint.save_stage, self.cfg.checkpoint_dir, self.runtime, self.step
            )
