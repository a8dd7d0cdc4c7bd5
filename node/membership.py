"""A node's place in the swarm: its DHT record, the replicas it can see, joining a running stage.

Every `refresh_s` the node re-announces itself (state, throughput, load, step; the record expires
after `record_ttl_s` if the node dies), reads the records of its own and its neighbouring stages,
and dials any replica of the next stage it is not linked with yet. Without a DHT (a fixed
pipeline from `--next`) all of this is a no-op and every linked peer is routable.

Joining: a node whose stage has a synced replica downloads that replica's weights and optimizer
state (hivemind's state sharing) and then joins the stage's next averaging round with nothing to
add; after that round it is in sync and announces itself online (routable). A stage with no
replica left resumes from the newest checkpoint the swarm announced for it, never from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from node import checkpoint
from node.swarm.dht import SwarmDHT
from node.swarm.records import DIAL_OUT_ONLY, CheckpointRecord, NodeRecord, NodeState
from node.version import VERSION
from node.wire.messages import step_of

log = logging.getLogger(__name__)
SYNC_ATTEMPTS = 5
SHUTDOWN_DHT_S = 3.0  # DHT writes while leaving: never hold up a drain for long
BEHIND_IDLE_S = 5.0  # one step behind, idle, next-step work waiting: this long, then resync


class Membership:
    def __init__(self, node, dht):
        self.node, self.dht = node, dht
        self.dynamic = dht is not None
        self.swarm = SwarmDHT(dht, node.cfg.swarm) if self.dynamic else None
        self.records: dict[int, dict[str, NodeRecord]] = {}
        self._task: asyncio.Task | None = None
        self._idle_behind_since: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if not self.dynamic:
            return
        await self.announce()
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="membership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.dynamic:  # best effort, and quick: the DHT peers may be leaving too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.swarm.withdraw(self.node.k, self.node.node_id, self.node.cfg.record_ttl_s),
                    SHUTDOWN_DHT_S,
                )

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.node.cfg.refresh_s)
            try:
                await self.announce()
                await self.refresh()
            except Exception as err:  # the DHT is best effort; the data path does not need it
                log.warning("stage %d: membership refresh failed: %s", self.node.k, err)

    def maddrs(self) -> list[str]:
        """This node's DHT addresses: what another process passes as --initial-peers."""
        if not self.dynamic:
            return []
        from node.swarm.dht import visible_maddrs

        return visible_maddrs(self.dht)

    # ---- records -------------------------------------------------------------------------
    def _state(self, leaving: bool) -> NodeState:
        if leaving or self.node.draining:
            return NodeState.draining
        return NodeState.online if self.node.synced else NodeState.joining

    async def announce(self, leaving: bool = False) -> None:
        if not self.dynamic:
            return
        n = self.node
        address = n.cfg.announce or f"127.0.0.1:{n.port}"
        if address.endswith(":0"):  # a public host with whatever port we bound
            address = f"{address[:-2]}:{n.port}"
        if not n.cfg.reachable:
            address = DIAL_OUT_ONLY
        record = NodeRecord(
            peer_id=n.node_id,
            address=address,
            state=self._state(leaving),
            throughput=round(n.mb_per_s, 4),
            load=len(n.runtime.pending),
            version=VERSION,
            config_hash=n.fingerprint,
            step=n.step,
            loss=n.last_loss,
        )
        await self.swarm.announce(n.k, record, n.cfg.record_ttl_s)

    async def refresh(self) -> None:
        n = self.node
        stages = [s for s in (n.k - 1, n.k, n.k + 1) if 0 <= s < n.cfg.model.n_stages]
        found = await asyncio.gather(*(self.swarm.stage_members(s) for s in stages))
        for s, recs in zip(stages, found, strict=True):
            self.records[s] = {
                p: r for p, r in recs.items() if r.config_hash == n.fingerprint or p == n.node_id
            }
        await self._check_move()
        # links are symmetric, so one side of each must be reachable: we dial the next stage,
        # and a node that cannot accept connections (behind NAT) dials the previous one too
        sides = (n.k + 1,) if n.cfg.reachable else (n.k + 1, n.k - 1)
        for stage in sides:
            for peer, rec in self.records.get(stage, {}).items():
                usable = rec.state is not NodeState.draining and rec.dialable
                usable = usable and n.peers.guard.banned(peer) is None
                if usable and not n.presumed_dead(peer) and not n.peers.has_live(peer):
                    n.peers.dial_in_background(rec.address, n.cfg.connect_timeout_s, stage)
                elif not rec.dialable and rec.address == DIAL_OUT_ONLY and not n.cfg.reachable:
                    n.peers.warn_unlinkable(peer, stage)

    async def _check_move(self) -> None:
        """The coordinator's rebalancing: a move request for us -> drain, then restart serving
        the new stage (process.py re-executes the node; the Join sends it there)."""
        n = self.node
        if n.move_to is not None or not n.synced:
            return
        move = (await self.swarm.moves()).get(n.node_id)
        stages = n.cfg.model.n_stages
        if move is not None and move.from_stage == n.k and n.k != move.to_stage < stages:
            log.warning("stage %d: the coordinator moves this node to stage %d", n.k, move.to_stage)
            n.events.write("moving", stage=n.k, node=n.node_id, to_stage=move.to_stage)
            n.move_to = move.to_stage
            n.request_stop()

    def online(self, stage: int, peer: str) -> bool:
        """Is `peer` an in-sync replica of `stage` (any linked peer, without a DHT)?"""
        if not self.dynamic:
            return True
        rec = self.records.get(stage, {}).get(peer)
        return rec is not None and rec.state is not NodeState.joining

    def swarm_loss(self) -> float | None:
        """The swarm's latest training loss, as the last stage's replicas announce it (what a
        node of another stage shows in its progress line)."""
        recs = [r for r in self.records.get(self.node.cfg.model.n_stages - 1, {}).values()]
        recs = [r for r in recs if r.loss is not None]
        if not recs:
            return None
        top = max(r.step for r in recs)
        losses = [r.loss for r in recs if r.step == top]
        return sum(losses) / len(losses)

    def any_online(self, stage: int) -> bool:
        """Does the DHT show a replica of `stage` online, other than ones presumed dead?"""
        recs = self.records.get(stage, {})
        return any(
            r.state is NodeState.online and not self.node.presumed_dead(p) for p, r in recs.items()
        )

    def routable(self, peer: str) -> bool:
        if not self.dynamic:
            return True
        rec = self.records.get(self.node.k + 1, {}).get(peer)
        return rec is not None and rec.state is NodeState.online

    def throughputs(self) -> dict[str, float]:
        recs = self.records.get(self.node.k + 1, {})
        return {p: r.throughput for p, r in recs.items() if r.throughput > 0}

    def other_replicas(self) -> int:
        """Replicas of our stage (other than us) that should join our averaging rounds."""
        if not self.dynamic:
            return 0
        n = self.node
        return sum(
            1
            for p, r in self.records.get(n.k, {}).items()
            if p != n.node_id
            and p not in n.dead
            and not (r.state is NodeState.joining and r.step < n.step - 1)  # not loaded yet
        )

    def behind(self) -> bool:
        """Our weights are stale and we must resync: a replica of our stage is two or more
        steps ahead (it applied updates without us: we missed its rounds), or one step ahead
        while either our averaging rounds fail (a round that completed for the others but
        not for us: hivemind's all-reduce is not atomic; seen in CI) or we hold none of our
        step's work and upstream already sends the next step's (a replica that applied the
        step alone while we were joining; seen in CI). Waiting would stall the stage: the
        next step's work routed to us waits here. A replica applies a step only when its
        round covered every microbatch, ours included, so the state we download has our
        work in it. Being one step behind is normal for a moment at every step's end, so it
        counts only once it has lasted BEHIND_IDLE_S."""
        n = self.node
        if not self.dynamic:
            return False
        ahead = [
            r.step - n.step
            for p, r in self.records.get(n.k, {}).items()
            if p != n.node_id and r.state is NodeState.online and p not in n.dead
        ]
        if any(d >= 2 for d in ahead):
            return True
        L = n.ledger
        holds = L.counted or n.runtime.pending or L.sent_to or L.came_from
        idle = not n.is_first and n.early and not holds
        missed = n._round_fail_since is not None  # our rounds fail: the others applied it
        if not (1 in ahead and n.synced and (idle or missed)):
            self._idle_behind_since = None
            return False
        now = time.monotonic()
        self._idle_behind_since = self._idle_behind_since or now
        return now - self._idle_behind_since >= BEHIND_IDLE_S

    # ---- joining -------------------------------------------------------------------------
    async def initial_sync(self) -> None:
        """Decide where this node's state comes from before it takes any work."""
        n = self.node
        if not self.dynamic:
            return
        await self._await_replicas()
        mine = {p: r for p, r in self.records.get(n.k, {}).items() if p != n.node_id}
        online = [r for r in mine.values() if r.state is NodeState.online]
        swarm_step = await self._swarm_step()
        if swarm_step > 0 and online and await self.resync():
            return
        if not online and swarm_step > n.step and await self._from_checkpoint(swarm_step):
            return
        if swarm_step > n.step:
            log.warning(
                "stage %d: the swarm is at step %d and no replica or checkpoint of this stage "
                "could be loaded; waiting for one (never training from scratch)",
                n.k,
                swarm_step,
            )
            while not n.stopping.is_set() and not await self.resync():
                await self.refresh()
                alive = any(r.state is NodeState.online for r in self._others().values())
                if not alive and await self._from_checkpoint(swarm_step):
                    return
                await asyncio.sleep(5)
            return
        # a fresh swarm: every replica starts from the same seeded weights
        if n.is_first and not mine:  # alone? look again: two stage-0 replicas starting at
            await asyncio.sleep(2 * n.cfg.refresh_s)  # once must not both dispatch every id
            await self.refresh()
            mine = self._others()
        n.synced = not (n.is_first and mine)  # several stage-0 replicas: a bootstrap round
        if n.is_first and n.synced:
            n.group0 = [(n.node_id, 1.0)]
        if n.synced and n.averager is not None:
            n.averager.share_state(True)
        await self.announce()

    async def _await_replicas(self, timeout_s: float = 30.0) -> None:
        """With --replicas-hint R, give the stage's other replicas a moment to show up, so that
        replicas launched together start together (a late one would have to sync first)."""
        n = self.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.records.get(n.k, {})) < n.cfg.replicas_hint and loop.time() < deadline:
            if await self._swarm_step() > 0:
                return  # a running swarm: joining it is the normal path
            await asyncio.sleep(min(0.5, n.cfg.refresh_s))
            await self.refresh()

    def _others(self) -> dict[str, NodeRecord]:
        n = self.node
        return {p: r for p, r in self.records.get(n.k, {}).items() if p != n.node_id}

    async def _swarm_step(self) -> int:
        smap = await self.swarm.swarm_map(self.node.cfg.model.n_stages)
        steps = [r.step for recs in smap.values() for r in recs.values()]
        return max(steps, default=0)

    async def resync(self) -> bool:
        """Download the stage's state from a replica; the next averaging round syncs us."""
        n = self.node
        n.synced = False
        if n.averager is None:
            return False
        n.averager.share_state(False)
        await self.announce()
        loop = asyncio.get_running_loop()
        for attempt in range(SYNC_ATTEMPTS):
            got = await loop.run_in_executor(n.round_executor, n.averager.load_state, 20.0)
            if got is not None:
                meta, tensors = got
                try:
                    n.load_shared_state(meta, tensors)
                except (KeyError, TypeError, ValueError, RuntimeError) as err:
                    log.warning("stage %d: a replica sent an unusable state: %s", n.k, err)
                    continue
                # work of the step we loaded (or later) that was routed to us is ours to do:
                # we hold the stage's weights of exactly that step (older messages are void)
                n.early = [(lk, m) for lk, m in n.early if step_of(m) in (n.step, n.step + 1)]
                n._round_fail_since, n._round_attempts = None, 0  # that step is over
                if any(step_of(m) == n.step for _, m in n.early):
                    n.synced = True
                    n.averager.share_state(True)
                n._begin_step()
                await self.announce()  # joining, at the step we loaded: replicas expect us
                n.events.write("synced", stage=n.k, node=n.node_id, step=n.step)
                log.info("stage %d: downloaded the stage's state at step %d", n.k, n.step)
                return True
            await asyncio.sleep(1.0 + attempt)
        return False

    async def _from_checkpoint(self, swarm_step: int) -> bool:
        n = self.node
        records = await self.swarm.checkpoints(n.k)
        for rec in sorted(records.values(), key=lambda r: -r.step):
            path = Path(rec.path)
            if not (path / checkpoint.STAGE_FILE.format(k=n.k)).is_file():
                continue
            with n.state_lock:
                step = checkpoint.load_stage(path, n.runtime)
            log.warning(
                "stage %d: no replica left: resumed from the checkpoint of step %d at %s "
                "(the swarm is at step %d)",
                n.k,
                step,
                path,
                swarm_step,
            )
            n.step, n.synced = max(step, swarm_step), True
            if n.is_first:
                n.group0 = [(n.node_id, 1.0)]
                n.hold_until = time.monotonic() + n.cfg.adopt_wait_s
            n._begin_step()
            n.events.write("resumed", stage=n.k, node=n.node_id, step=n.step, checkpoint=step)
            await self.announce()
            return True
        return False

    async def announce_checkpoint(self) -> None:
        n = self.node
        if not self.dynamic or not n.cfg.checkpoint_dir:
            return
        record = CheckpointRecord(
            peer_id=n.node_id, path=str(Path(n.cfg.checkpoint_dir).resolve()), step=n.step
        )
        await self.swarm.announce_checkpoint(n.k, record, ttl_s=24 * 3600)
