"""Exact recovery when a replica dies mid-step (a mixin of StageNode, see daemon.py).

Every neighbour of the dead node N re-sends what it holds of N's microbatches (kept in its step
ledger until the step after next begins) to one surviving replica of N's stage, the adopter:

- an upstream neighbour re-sends the z it had sent N (`Forward`, replay_of=N; grad_needed says
  whether it still waits for that microbatch's dL/dz);
- a downstream neighbour re-sends the dL/dz it had sent N, or a claim without a gradient if it
  has not computed it yet (`Backward`, replay_of=N), and from then on sends it to the adopter;
- each ends with REPLAY_END.

The adopter then recomputes N's share of the step from those tensors: forward (and backward where
the gradient is known), sending on only what the pipeline still lacks. Replicas hold identical
weights within a step, so the recomputed gradients are the ones N had computed: the step's update
equals the one without the failure. Stage 0's ids need no upstream: they derive from the seed, and
the dead replica's share is known to every stage-0 replica (`split_share`).

All neighbours pick the same adopter (the lowest node id among the stage's linked replicas). If
no replica of that stage is left, the reports wait until one links (the swarm pauses).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from node.data import DataMismatchError, Microbatch, MicrobatchId
from node.errors import NodeFailed
from node.ledger import StepLedger
from node.peering import LinkDown
from node.swarm.routing import split_share
from node.transport.link import Link
from node.wire.messages import Backward, Forward, MessageError, Notice
from node.wire.messages import NoticeKind as NK

log = logging.getLogger(__name__)


@dataclass
class Adoption:
    dead: str
    step: int
    t0: float = field(default_factory=time.monotonic)
    forwards: dict[int, Forward] = field(default_factory=dict)  # from upstream: the z N got
    up_of: dict[int, str] = field(default_factory=dict)
    grad_needed: dict[int, bool] = field(default_factory=dict)
    claims: dict[int, tuple[str, torch.Tensor | None]] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # neighbours that sent REPLAY_END
    done: bool = False


class Recovery:
    def __init__(self) -> None:
        self.adoptions: dict[tuple[str, int], Adoption] = {}
        self.orphans: list[tuple[str, str]] = []  # (dead node, side): no adopter linked yet
        self.dead: set[str] = set()
        self.dead_at: dict[str, float] = {}  # when we saw each die (monotonic)
        self.replay_ends: dict[int, set[str]] = {}  # step -> neighbours that sent REPLAY_END
        self.hold_until: float | None = None  # see hold_dispatch

    def hold_dispatch(self) -> bool:
        """A stage-0 node that took over a stage with no replica left (from a checkpoint) waits
        before dispatching its step until each downstream replica has said what it holds of
        the dead node's microbatches (REPLAY_END): the microbatches the dead node had already
        sent are recomputed from those claims, not sent again (a second forward of one id is
        refused). A downstream node that never saw the death sends nothing: wait adopt_wait_s."""
        if self.hold_until is None:
            return False
        downs = {p for p in self.peers.live("down") if p not in self.leaving}
        heard = self.replay_ends.get(self.step, set())
        if (downs and downs <= heard) or time.monotonic() > self.hold_until:
            self.hold_until = None
            return False
        return True

    def presumed_dead(self, peer: str) -> bool:
        """Is `peer` dead as far as we know? A node restarted under the same id (systemd, `resbm
        join`) is a new process: once the dead one's DHT record has expired (records live
        record_ttl_s and are refreshed every refresh_s), a record under that id is the new
        one's, so it may be dialed again; a live link to it proves it outright."""
        if peer not in self.dead or self.peers.has_live(peer):
            return False
        horizon = self.cfg.record_ttl_s + 2 * self.cfg.refresh_s
        return time.monotonic() - self.dead_at.get(peer, time.monotonic()) < horizon

    def align_resumed_step(self, link: Link, msg, step: int | None) -> None:
        """A fixed pipeline just restarted with --resume: its stages' newest checkpoints can be
        one checkpoint apart (a node killed after its neighbour saved a step and before it
        did). Stage 0 keeps the step count: before doing anything else, a resumed stage takes
        the step of the first forward from upstream. Behind, it skips to it (its updates since
        its checkpoint are lost); ahead, it re-does steps with newer weights. Either way the
        run goes on to --steps with sane losses, as a swarm resumes from a checkpoint."""
        if (
            self.membership.dynamic
            or self.resumed_at is None
            or self.resumed_at != self.step
            or not isinstance(msg, Forward)
            or msg.replay_of
            or step is None
            or step == self.step
            or not 0 <= step < self.cfg.steps
            or self.peers.side_of(link) != "up"
            or self._started()
        ):
            return
        log.warning(
            "stage %d: resumed at step %d but stage %d is at step %d: continuing at step %d",
            self.k,
            self.step,
            self.k - 1,
            step,
            step,
        )
        self.events.write("aligned", stage=self.k, node=self.node_id, step=step, resumed=self.step)
        self.step, self.resumed_at = step, None
        self._begin_step()

    def _mark_dead(self, peer: str) -> None:
        self.dead.add(peer)
        self.dead_at[peer] = time.monotonic()

    def adoptions_open(self) -> bool:
        return any(not a.done for (_, s), a in self.adoptions.items() if s == self.step)

    # ---- as a neighbour of the dead node ---------------------------------------------------
    async def on_link_down(self, link: Link, msg: LinkDown) -> None:
        peer = link.peer_id
        if not peer or peer in self.dead:
            return
        side = self.peers.side_of(link)
        if self.peers.has_live(peer):  # linked again before we got here: the link flapped
            if self.membership.dynamic and peer not in self.leaving:
                self._flapped(peer, side, msg.reason)
            return
        if peer in self.leaving:
            log.info("stage %d: %s left", self.k, peer)
            return
        if not self.membership.dynamic:  # a fixed pipeline: no replica can take over
            L = self.ledger
            if peer in (L.sent_to if side == "down" else L.came_from).values() or self._started():
                raise NodeFailed(
                    f"the link to {peer} (stage {link.peer_stage}) closed mid-run: {msg.reason}"
                )
            log.info("stage %d: link to %s closed: %s", self.k, peer, msg.reason)
            return
        self._mark_dead(peer)
        self.stats["deaths_seen"] += 1
        # what it sent for the next step is void: its adopter re-sends or recomputes it
        self.early = [(lk, m) for lk, m in self.early if lk.peer_id != peer]
        log.warning(
            "stage %d: %s (stage %d) is gone: %s", self.k, peer, link.peer_stage, msg.reason
        )
        self.events.write("peer_lost", stage=self.k, node=self.node_id, peer=peer, step=self.step)
        self._report(peer, side, first=True)

    def _flapped(self, peer: str, side: str, reason: str) -> None:
        """The same peer is linked again: re-send it what the cut may have lost (it
        redelivers, see _redeliver), and the STEP_DONEs it may not have heard."""
        log.warning("stage %d: the link to %s broke (%s) and is back", self.k, peer, reason)
        for L in (self.prev_ledger, self.ledger):
            if L is not None:
                L.done_told.discard(peer)
        self._report(peer, side, to=peer)

    def _adopter(self, side: str) -> str | None:
        stage = self.k + (1 if side == "down" else -1)
        live = [
            p
            for p in self.peers.live(side)
            if p not in self.leaving and p not in self.dead and self.membership.online(stage, p)
        ]
        return min(live) if live else None

    def _report(self, dead: str, side: str, first: bool = False, to: str | None = None) -> None:
        """`to`: the dead node itself, linked again (a cut, or a restart under the same id)."""
        adopter = to or self._adopter(side)
        if adopter is None:
            if first:  # retried every pump: say it once
                log.warning(
                    "stage %d: no replica of stage %d is left: paused until one joins",
                    self.k,
                    self.k + (1 if side == "down" else -1),
                )
            self.orphans.append((dead, side))
            return
        link = self.peers.live(side)[adopter]
        for L in (self.prev_ledger, self.ledger):
            if L is None:
                continue
            sent = self._replay_to(link, dead, side, L)
            self._post(link, Notice(NK.replay_end, L.step, (), dead))
            if sent:
                log.info(
                    "stage %d: re-sent %d microbatches of step %d from %s to %s",
                    self.k,
                    sent,
                    L.step,
                    dead,
                    adopter,
                )
        if side == "up" and self.k == 1:  # a dead stage-0 replica: its adopter may be a step
            # ahead of us already, with the dead one's share of that step to dispatch
            self._post(link, Notice(NK.replay_end, self.ledger.step + 1, (), dead))

    def _replay_to(self, link: Link, dead: str, side: str, L: StepLedger) -> int:
        sent = 0
        if side == "down":  # we had sent the dead node these z
            for i, dst in list(L.sent_to.items()):
                if dst == dead:
                    f = L.z_out[i]
                    msg = Forward(
                        f.id, f.z, f.offsets, f.data_fingerprint, dead, i not in L.grad_out
                    )
                    self._post(link, msg)
                    L.sent_to[i] = link.peer_id
                    sent += 1
        else:  # the dead node had sent us these z: give its adopter our dL/dz (or a claim)
            for i, src in list(L.came_from.items()):
                if src == dead:
                    self._post(link, Backward(MicrobatchId(L.step, i), L.grad_in.get(i), dead))
                    L.came_from[i] = link.peer_id
                    sent += 1
        return sent

    def retry_orphans(self) -> None:
        for peer in [p for p in self.dead if self.peers.has_live(p)]:
            self.dead.discard(peer)  # linked again: a restarted node, or the same one after
            for L in (self.prev_ledger, self.ledger):  # a flap: our STEP_DONE may be lost
                if L is not None:
                    L.done_told.discard(peer)
        orphans, self.orphans = self.orphans, []
        for dead, side in orphans:  # to the same node when it is back: it still holds its work
            self._report(dead, side, to=dead if self.peers.has_live(dead) else None)

    # ---- as the adopter ------------------------------------------------------------------
    def _adoption(self, dead: str, step: int) -> Adoption | None:
        if step < self.step:
            return None  # that step is finished here: the dead node's part was counted
        # our own id: we are a restarted node and the neighbours hand us what our previous
        # process held (recomputing skips what this process already counted or holds)
        if not self.synced or self.peers.has_live(dead) or not dead:
            self.errors["bad_replay"] += 1  # not ours to adopt (or a peer's nonsense)
            return None
        key = (dead, step)
        if key not in self.adoptions:
            self.adoptions[key] = Adoption(dead, step)
            if dead != self.node_id:
                self._mark_dead(dead)
            log.info("stage %d: adopting %s's part of step %d", self.k, dead, step)
        return self.adoptions[key]

    async def on_replay_forward(self, link: Link, msg: Forward) -> None:
        if self.peers.side_of(link) != "up" or msg.z is None or not 0 <= msg.id.index < self.M:
            self.errors["bad_replay"] += 1
            return
        try:
            self.batches.check(Microbatch(msg.id, msg.offsets, msg.data_fingerprint))
        except DataMismatchError as err:  # another corpus: a config problem, not garbage
            self.peers.refuse(link, MessageError(msg.id, "FAILED_PRECONDITION", str(err)))
            return
        except ValueError as err:
            self.peers.refuse(link, MessageError(msg.id, "INVALID_ARGUMENT", str(err)))
            return
        a = self._adoption(msg.replay_of, msg.id.step)
        if a is not None and not a.done:
            a.forwards[msg.id.index] = msg
            a.up_of[msg.id.index] = link.peer_id
            a.grad_needed[msg.id.index] = msg.grad_needed

    def on_replay_backward(self, link: Link, msg: Backward) -> None:
        if self.peers.side_of(link) != "down" or not 0 <= msg.id.index < self.M:
            self.errors["bad_replay"] += 1
            return
        a = self._adoption(msg.replay_of, msg.id.step)
        if a is not None and not a.done:
            a.claims[msg.id.index] = (link.peer_id, msg.grad)

    def late_claim(self, link: Link, msg: Backward) -> bool:
        """A gradient that a claim promised, arriving before we processed the adoption."""
        for (_, step), a in self.adoptions.items():
            claim = a.claims.get(msg.id.index)
            if step == msg.id.step and not a.done and claim and claim[0] == link.peer_id:
                a.claims[msg.id.index] = (link.peer_id, msg.grad)
                return True
        return False

    def on_replay_end(self, link: Link, msg: Notice) -> None:
        for step in [s for s in self.replay_ends if s < self.step]:
            del self.replay_ends[step]
        if self.step <= msg.step <= self.step + 2:  # a peer's input: bounded
            self.replay_ends.setdefault(msg.step, set()).add(link.peer_id)
        a = self._adoption(msg.peer, msg.step)
        if a is not None:
            a.reported.add(link.peer_id)

    def _ready(self, a: Adoption) -> bool:
        if self.is_first and not a.claims:
            share = split_share(self.group0 or [], self.M).get(a.dead)
            if not share:
                return True  # it had no share of this step: nothing to redo
        sides = [s for s, edge in (("up", self.is_first), ("down", self.is_last)) if not edge]
        expected = {p for s in sides for p in self.peers.live(s) if p not in self.leaving}
        waited = time.monotonic() - a.t0 > self.cfg.adopt_wait_s
        return expected <= a.reported or waited

    async def process_adoptions(self) -> None:
        for (_, step), a in list(self.adoptions.items()):
            if step == self.step and not a.done and self._ready(a):
                await self._adopt(a)
            elif step < self.step:
                del self.adoptions[(a.dead, step)]

    async def _adopt(self, a: Adoption) -> None:
        L, a.done = self.ledger, True
        if a.dead == self.node_id:
            await self._redeliver(a)
        ids = set(a.forwards) | set(a.claims)
        if self.is_first and self.group0:
            share = split_share(self.group0, self.M).get(a.dead, [])
            ids |= set(share)
            L.share.extend(i for i in share if i not in L.share)
        redo = sorted(
            i
            for i in ids
            if i not in L.counted and MicrobatchId(self.step, i) not in self.runtime.pending
        )
        log.info("stage %d: recomputing %d microbatches of %s: %s", self.k, len(redo), a.dead, redo)
        for i in redo:
            await self._recompute(a, i)
        self.events.write(
            "adopted", stage=self.k, node=self.node_id, dead=a.dead, step=self.step, ids=redo
        )

    async def _redeliver(self, a: Adoption) -> None:
        """Our own id came back to us: a neighbour took us for dead when our link to it broke
        (a flapping link, a NAT mapping dropped) and re-sent what it held of ours. This process
        still holds its step, so nothing is recomputed twice: what the cut lost is delivered.
        Upstream re-sent a z we had computed and it still needs the gradient: send that again.
        Downstream re-sent a gradient we are still waiting for: apply it. (A z we never got is
        recomputed below, as for a restarted node.)"""
        L = self.ledger
        for i in sorted(a.forwards):
            if i in L.counted and a.grad_needed.get(i, True) and i in L.grad_in:
                self._grad_upstream(i)
        for i, (holder, grad) in sorted(a.claims.items()):
            mid = MicrobatchId(self.step, i)
            link = self.peers.live("down").get(holder)
            if grad is not None and link is not None and mid in self.runtime.pending:
                await self._on_backward(link, Backward(mid, grad))

    async def _recompute(self, a: Adoption, i: int) -> None:
        L = self.ledger
        if self.is_first:
            mb, z, f = self.batches.microbatch(self.step, i), None, None
        else:
            f = a.forwards.get(i)
            if f is None:  # nobody upstream held it: it cannot be recomputed exactly
                self.stats["lost"] += 1
                log.error("stage %d: microbatch %d of step %d is lost", self.k, i, self.step)
                return
            mb, z = Microbatch(f.id, f.offsets, f.data_fingerprint), f.z
            L.came_from[i], L.z_in[i] = a.up_of[i], f
            if not a.grad_needed.get(i, True):
                L.no_grad_back.add(i)
        L.recomputed += 1
        self.stats["recomputed"] += 1
        if self.is_last:
            await self._last_stage(i, mb, z)
            return
        z_out = await self._compute(self.runtime.forward, mb, z)
        fwd = Forward(mb.id, z_out, mb.offsets, mb.fingerprint if f is None else f.data_fingerprint)
        claim = a.claims.get(i)
        if claim is None:  # the pipeline never got past the dead node: carry on as normal
            if self.is_first and i in L.queue:
                L.queue.remove(i)
            self._send_forward(i, fwd)
            return
        holder, grad = claim
        L.sent_to[i], L.z_out[i] = holder, fwd
        if self.is_first and i in L.queue:
            L.queue.remove(i)
        if grad is None:
            return  # the holder sends the gradient here when it has it
        grad_in = await self._compute(self.runtime.backward, mb.id, grad)
        L.grad_out[i] = grad
        self._count(i)
        if grad_in is not None:
            L.grad_in[i] = grad_in
            self._grad_upstream(i)
