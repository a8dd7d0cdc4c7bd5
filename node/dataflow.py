"""The data path of a stage node: dispatching stage 0's share, forwards, backwards, STEP_DONE.

A mixin of StageNode (daemon.py), split out to keep each file readable: it reads and writes the
node's step ledger, runtime and links. Every message from a peer is checked before anything of it
is applied; a refusal tells the peer why (its gRPC status name) and changes nothing here.
"""

from __future__ import annotations

import logging
import os
import signal

from node.data import DataMismatchError, Microbatch, MicrobatchId
from node.errors import NodeFailed
from node.guard import BANNED_PREFIX
from node.peering import LinkDown
from node.runtime import UnknownMicrobatchError
from node.swarm.routing import pick_replica
from node.transport.link import Link, LinkClosed
from node.wire.codec import MAX_ABS, WireError
from node.wire.messages import Backward, ErrorReport, Forward, MessageError, Notice, step_of
from node.wire.messages import NoticeKind as NK

log = logging.getLogger(__name__)
MEASURE_AFTER = 8  # microbatches before a replica announces its measured throughput


KNOWN_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "UNAVAILABLE",
        "PERMISSION_DENIED",
        "INTERNAL",
        "DATA_LOSS",
    }
)


def _is_ban(report: ErrorReport) -> bool:
    return report.code == "PERMISSION_DENIED" and report.message.startswith(BANNED_PREFIX)


class DataFlow:
    # ---- stage 0: dispatch its share ---------------------------------------------------
    async def _pump(self) -> None:
        L = self.ledger
        await self.process_adoptions()
        self.retry_orphans()
        if L.stalled and self._route() is not None:  # a downstream replica is back
            stalled, L.stalled = L.stalled, []
            for i in stalled:
                self._send_forward(i, L.z_out[i])
        if not self.is_first or not self.synced or self.hold_dispatch():
            return
        limit = min(self.M, self.cfg.max_in_flight or self.cfg.model.n_stages)
        while L.queue and len(self.runtime.pending) < limit and self._route() is not None:
            i = L.queue.pop(0)
            mb = self.batches.microbatch(self.step, i)
            z = await self._compute(self.runtime.forward, mb)
            self._send_forward(i, Forward(mb.id, z, mb.offsets, mb.fingerprint))
            self.maybe_fail("forward")

    def _route(self) -> str | None:
        live = self.peers.live("down")
        load = self.ledger.outstanding()
        routable = {p: load.get(p, 0) for p in live if self.membership.routable(p)}
        staying = {p: n for p, n in routable.items() if p not in self.leaving}
        # a draining replica finishes the step it is in: when it is the only one left (the
        # whole swarm stops at once), this step's work still goes to it
        candidates = staying or {p: n for p, n in routable.items() if self._in_step(p)}
        return pick_replica(candidates, self.membership.throughputs())

    def _in_step(self, peer: str) -> bool:
        """Did `peer` take part in our current step already (so it will finish it)?"""
        return peer in self.ledger.sent_to.values()

    def _send_forward(self, i: int, fwd: Forward) -> None:
        L = self.ledger
        L.z_out[i] = fwd
        dst = self._route()
        if dst is None:
            L.stalled.append(i)
            return
        fwd = self._maybe_garble(fwd)
        L.sent_to[i] = dst
        self._post(self.peers.downs[dst], fwd)

    def _post(self, link: Link | None, msg) -> bool:
        """Post to a neighbour; one that is gone costs this message, not the node (recovery
        re-sends what it needs)."""
        try:
            if link is None:
                raise LinkClosed("no link")
            link.post(msg)
            tensor = msg.z if isinstance(msg, Forward) else getattr(msg, "grad", None)
            if tensor is not None:  # what a ban notice is checked against (node/guard.py)
                side = "forward" if isinstance(msg, Forward) else "backward"
                self.peers.guard.sent.record(link.peer_id, side, msg.id.step, msg.id.index, tensor)
            return True
        except LinkClosed as err:
            self.errors["unsent"] += 1
            log.info("stage %d: could not send %s: %s", self.k, type(msg).__name__, err)
            return False
        except WireError as err:  # our own output is not sendable (non-finite): drop, log
            self.errors["unsendable"] += 1
            log.error("stage %d: not sending %s: %s", self.k, type(msg).__name__, err)
            return False

    def maybe_fail(self, phase: str) -> None:
        """Fault injection (tests, chaos): SIGKILL this node's whole process group mid-step."""
        at = self.cfg.fail_at_step  # the first such moment at or after that step
        if at is not None and self.step >= at and self.cfg.fail_phase == phase:
            log.warning(
                "stage %d: fault injection: SIGKILL at step %d (%s)", self.k, self.step, phase
            )
            self.events.write("killed", stage=self.k, node=self.node_id, step=self.step)
            self.events.close()
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def _maybe_garble(self, fwd: Forward) -> Forward:
        """Fault injection (`fail_phase` garbage): one finite but absurd activation, once."""
        at = self.cfg.fail_at_step
        if at is None or self.cfg.fail_phase != "garbage" or self.step < at or self._garbled:
            return fwd
        self._garbled = True
        log.warning("stage %d: fault injection: sending garbage at step %d", self.k, self.step)
        self.events.write("garbage", stage=self.k, node=self.node_id, step=self.step)
        return Forward(fwd.id, fwd.z * 1e6, fwd.offsets, fwd.data_fingerprint)

    # ---- dispatch ------------------------------------------------------------------------
    async def _handle(self, link: Link, msg) -> None:
        if isinstance(msg, LinkDown):
            await self.on_link_down(link, msg)
            return
        if self.peers.guard.banned(link.peer_id) is not None:
            return  # queued before its ban: nothing a banned peer sent is used
        if isinstance(msg, ErrorReport) and _is_ban(msg):
            self._on_banned(link, msg)
            return
        step = step_of(msg)
        self.align_resumed_step(link, msg, step)
        buffered = not (isinstance(msg, Notice) and msg.kind == NK.leaving)
        if buffered and isinstance(msg, (Forward, Backward, Notice)) and step is not None:
            if step == self.step + 1 and len(self.early) < 8 * self.M + 64:
                self.early.append((link, msg))  # a neighbour is one step ahead: normal
                return
            if step > self.step + 1 and self.membership.dynamic:
                log.warning("stage %d: got step %d at step %d: resyncing", self.k, step, self.step)
                await self.membership.resync()  # we are behind the swarm
                return
        if isinstance(msg, Forward):
            await (
                self.on_replay_forward(link, msg) if msg.replay_of else self._on_forward(link, msg)
            )
        elif isinstance(msg, Backward):
            if msg.replay_of:
                self.on_replay_backward(link, msg)
            else:
                await self._on_backward(link, msg)
        elif isinstance(msg, Notice):
            self._on_notice(link, msg)
        elif isinstance(msg, ErrorReport):
            code = msg.code if msg.code in KNOWN_CODES else "other"  # a peer's string: bounded
            self.errors["peer_" + code] += 1
            log.warning(
                "stage %d: %s reports %s: %s", self.k, link.peer_id, code, msg.message[:300]
            )

    def _on_banned(self, link: Link, msg: ErrorReport) -> None:
        """A neighbour banned us. If our own record says what we sent it was garbage (bad
        hardware, a broken install), stop, as a crash would: the swarm recomputes our work
        without us. Otherwise its word alone does not stop us; that link stays closed."""
        self.errors["banned_by_peer"] += 1
        verdict = None
        if msg.id is not None:
            verdict = self.peers.guard.sent.verdict(
                link.peer_id, msg.id.step, msg.id.index, MAX_ABS
            )
        if verdict is not None:
            raise NodeFailed(
                f"neighbour {link.peer_id} banned this node, and rightly: {verdict} "
                f"({msg.message}); check this machine's hardware and install"
            )
        log.error(
            "stage %d: neighbour %s banned this node (%s), but what we sent it passes our own "
            "checks: not stopping",
            self.k,
            link.peer_id,
            msg.message,
        )

    def _on_notice(self, link: Link, msg: Notice) -> None:
        if msg.kind == NK.leaving:
            self.leaving.add(link.peer_id)
            log.info("stage %d: %s is leaving", self.k, link.peer_id)
        elif msg.kind == NK.replay_end:
            self.on_replay_end(link, msg)
        elif msg.kind == NK.step_done:
            if self.peers.side_of(link) != "up" or msg.step != self.step:
                return
            if any(not 0 <= i < self.M for i in msg.ids):
                self.errors["INVALID_ARGUMENT"] += 1
                return
            self.ledger.done_from[link.peer_id] = set(msg.ids)

    # ---- forward -------------------------------------------------------------------------
    def _check_forward(self, link: Link, msg: Forward) -> tuple[str, str] | None:
        mid = msg.id
        if self.is_first or self.peers.side_of(link) != "up":
            return ("INVALID_ARGUMENT", "forward messages must come from the upstream stage")
        if msg.z is None:
            return ("INVALID_ARGUMENT", "forward without a boundary tensor")
        if mid.step != self.step:
            return ("FAILED_PRECONDITION", f"this stage is at step {self.step}")
        if not 0 <= mid.index < self.M:
            return ("INVALID_ARGUMENT", f"microbatch index outside 0..{self.M - 1}")
        if not self.synced:
            return ("UNAVAILABLE", "this replica is still syncing its weights")
        if mid.index in self.ledger.z_in:
            return ("ALREADY_EXISTS", "this microbatch was already forwarded")
        try:
            self.batches.check(Microbatch(mid, msg.offsets, msg.data_fingerprint))
        except DataMismatchError as err:
            return ("FAILED_PRECONDITION", str(err))
        except ValueError as err:
            return ("INVALID_ARGUMENT", str(err))
        return None

    async def _on_forward(self, link: Link, msg: Forward) -> None:
        problem = self._check_forward(link, msg)
        if problem is not None:
            self.peers.refuse(link, MessageError(msg.id, *problem))
            return
        i, L = msg.id.index, self.ledger
        L.came_from[i], L.z_in[i] = link.peer_id, msg
        mb = Microbatch(msg.id, msg.offsets, msg.data_fingerprint)
        if self.is_last:
            await self._last_stage(i, mb, msg.z)
        else:
            z = await self._compute(self.runtime.forward, mb, msg.z)
            self._send_forward(i, Forward(msg.id, z, msg.offsets, msg.data_fingerprint))
        self.maybe_fail("forward")

    async def _last_stage(self, i: int, mb: Microbatch, z) -> None:
        L = self.ledger
        result = await self._compute(self.runtime.forward_backward, mb, z)
        self._count(i, result.loss)
        L.grad_in[i] = result.grad_input
        self._grad_upstream(i)

    def _count(self, i: int, loss: float | None = None) -> None:
        L = self.ledger
        L.counted.add(i)
        if loss is not None:
            L.loss_sum += loss
        self.stats["counted"] += 1
        # measured throughput: a moving average of compute seconds per microbatch, announced
        # only after a few samples (the first ones are slow: a replica would look slow, get no
        # work and never be measured again); until then routing treats it as an average one
        dt, self._compute_mark = self.compute_s - self._compute_mark, self.compute_s
        if dt > 0:
            self._s_per_mb = dt if not self._s_per_mb else 0.8 * self._s_per_mb + 0.2 * dt
        if self.stats["counted"] >= MEASURE_AFTER and self._s_per_mb:
            self.mb_per_s = 1.0 / self._s_per_mb

    def _grad_upstream(self, i: int) -> None:
        """Send our dL/dz to whoever sent us microbatch i (unless it already has it)."""
        L = self.ledger
        if self.is_first or i in L.no_grad_back:
            return
        up = self.peers.ups.get(L.came_from.get(i, ""))
        if up is not None and not up.closed.is_set():
            self._post(up, Backward(MicrobatchId(self.step, i), L.grad_in[i]))
        # else: that replica died; our report to its adopter carries this gradient

    # ---- backward ------------------------------------------------------------------------
    async def _on_backward(self, link: Link, msg: Backward) -> None:
        mid, L = msg.id, self.ledger
        i = mid.index
        if self.is_last or self.peers.side_of(link) != "down":
            problem = ("INVALID_ARGUMENT", "backward messages must come from the downstream stage")
        elif msg.grad is not None and self.late_claim(link, msg):
            return
        elif (
            mid.step != self.step
            or L.sent_to.get(i) != link.peer_id
            or i in L.grad_out
            or mid not in self.runtime.pending
            or msg.grad is None
        ):
            problem = ("NOT_FOUND", f"no forward of this microbatch is pending on stage {self.k}")
        else:
            problem = None
        if problem is not None:
            self.peers.refuse(link, MessageError(mid, *problem))
            return
        try:
            grad_in = await self._compute(self.runtime.backward, mid, msg.grad)
        except (UnknownMicrobatchError, ValueError) as err:
            self.peers.refuse(link, MessageError(mid, "INVALID_ARGUMENT", str(err)))
            return
        L.grad_out[i] = msg.grad
        self._count(i)
        if grad_in is not None:
            L.grad_in[i] = grad_in
            self._grad_upstream(i)
        self.maybe_fail("backward")
