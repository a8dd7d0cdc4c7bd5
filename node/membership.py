"""A node's place in the swarm: its DHT record, the replicas it can see, joining a running stage.

Every `refresh_s` the node re-announces itself (state, throughput, load, step; the record expires
after `record_ttl_s` if the node dies), reads the records of its own and its neighbouring stages,
and dials any replica of the next stage it is not linked with yet. Without a DHT (a fixed
pipeline from `--next`) all of this is a no-op and every linked peer is routable.

Joining: a node whose stage has a synced replica downloads that replica's weights and optimizer
state (from its averager, over hivemind's p2p) and then joins the stage's next averaging round
with nothing to add; after that round it is in sync and announces itself online (routable). It
asks only replicas whose records vouch for the state they hold, and takes a state only if its
digest is vouched for by two of them where two vouch (node/protocol/vouching.py, #10 C2). A
stage with no replica left resumes from the newest checkpoint the swarm announced for it, never
from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node import checkpoint
from node.protocol.vouching import OK, WAIT, Vouches, snapshot_digest
from node.swarm.dht import DHTUnavailable, SwarmDHT
from node.swarm.records import (
    DIAL_OUT_ONLY,
    CheckpointRecord,
    NodeRecord,
    NodeState,
    Vouch,
    checkpoint_place,
)
from node.version import VERSION
from node.wire.messages import printable

log = logging.getLogger(__name__)
SYNC_ATTEMPTS = 5
MAX_DONORS = 8  # vouchers asked in one attempt
MIN_STATE_RATE = 8e6  # bytes/s: a state download's time allowance grows with its size
SHUTDOWN_DHT_S = 3.0  # DHT writes while leaving: never hold up a drain for long


@dataclass(frozen=True)
class Status:
    """What this node announces about itself (read from the stage machine's state)."""

    step: int
    synced: bool
    draining: bool
    throughput: float
    load: int
    loss: float | None
    vouches: list[tuple[int, str]] = field(default_factory=list)  # (step, state digest)
    averager: str | None = None  # our averager's hivemind peer id: where joiners download


@dataclass
class Placement:
    """Where a node's state came from when it started (see Membership.initial_sync)."""

    step: int | None = None  # set: resumed a stage with no replica left from a checkpoint
    synced: bool = True
    group0: list[tuple[str, float]] | None = None
    hold: bool = False  # stage 0 resumed from a checkpoint: wait for the claims first
    downloaded: bool = False  # took a replica's state (the machine holds it)
    checkpoint: int | None = None  # the step of the checkpoint it resumed from


class Membership:
    """The DHT side of a node. It reads the node only through `status()` and acts on it only
    through the callbacks it was given (a move request, a state download, a checkpoint load):
    no back-pointer. `records` is what the stage machine gets as its View."""

    def __init__(
        self,
        cfg,
        dht,
        peers,
        node_id: str,
        fingerprint: str,
        status: Callable[[], Status],
        presumed_dead: Callable[[str], bool],
        on_move: Callable[[int], None],
        max_state_bytes: int = 1 << 30,
        max_tensors: int = 1 << 16,
    ):
        self.cfg, self.dht, self.peers = cfg, dht, peers
        self.k, self.node_id, self.fingerprint = cfg.stage, node_id, fingerprint
        self.status, self.presumed_dead, self.on_move = status, presumed_dead, on_move
        self.dynamic = dht is not None
        # our records are sealed by our key: only we can write under our id (swarm/owned.py)
        self.swarm = SwarmDHT(dht, cfg.swarm, identity=peers.identity) if self.dynamic else None
        self.records: dict[int, dict[str, NodeRecord]] = {}
        self.version = 0  # bumped at every refresh: the driver passes new records on
        self.moving = False
        self.max_state_bytes = max_state_bytes  # a download larger than this is refused
        self.max_tensors = max_tensors  # and one of more tensors
        self._task: asyncio.Task | None = None

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
                    self.swarm.withdraw(self.k, self.node_id, self.cfg.record_ttl_s),
                    SHUTDOWN_DHT_S,
                )

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            try:
                await self.announce()
                await self.refresh()
            except Exception as err:  # the DHT is best effort; the data path does not need it
                log.warning("stage %d: membership refresh failed: %s", self.k, err)

    def maddrs(self) -> list[str]:
        """This node's DHT addresses: what another process passes as --initial-peers."""
        if not self.dynamic:
            return []
        from node.swarm.dht import visible_maddrs

        return visible_maddrs(self.dht)

    # ---- records -------------------------------------------------------------------------
    async def announce(self, leaving: bool = False) -> None:
        if not self.dynamic:
            return
        st, cfg = self.status(), self.cfg
        address = cfg.announce or f"127.0.0.1:{self.peers.port}"
        if address.endswith(":0"):  # a public host with whatever port we bound
            address = f"{address[:-2]}:{self.peers.port}"
        if not cfg.reachable:
            address = DIAL_OUT_ONLY
        if leaving or st.draining:
            state = NodeState.draining
        else:
            state = NodeState.online if st.synced else NodeState.joining
        # for joiners; a finished or draining replica too: a lagging one syncs from it
        vouching = st.synced and st.averager is not None
        record = NodeRecord(
            peer_id=self.node_id,
            address=address,
            state=state,
            throughput=round(st.throughput, 4),
            load=st.load,
            version=VERSION,
            config_hash=self.fingerprint,
            step=st.step,
            loss=st.loss,
            averager=st.averager if vouching else None,
            vouches=[Vouch(step=t, digest=d) for t, d in st.vouches] if vouching else [],
        )
        await self.swarm.announce(self.k, record, cfg.record_ttl_s)

    async def refresh(self) -> None:
        cfg = self.cfg
        stages = [s for s in (self.k - 1, self.k, self.k + 1) if 0 <= s < cfg.model.n_stages]
        # strict: a read that failed must not look like an empty stage (the machine would take
        # every suspect for dead, and a live replica for gone: found in review)
        reads = (self.swarm.stage_members(s, strict=True) for s in stages)
        found = await asyncio.gather(*reads, return_exceptions=True)
        if failed := [f for f in found if isinstance(f, BaseException)]:
            if not all(isinstance(f, DHTUnavailable) for f in failed):
                raise failed[0]  # a bug, not the network
            log.info("stage %d: DHT read failed (%s): keeping the last view", self.k, failed[0])
            return
        for s, recs in zip(stages, found, strict=True):
            self.records[s] = {
                p: r
                for p, r in recs.items()
                if r.config_hash == self.fingerprint or p == self.node_id
            }
        self.version += 1
        await self._check_move()
        # links are symmetric, so one side of each must be reachable: we dial the next stage,
        # and a node that cannot accept connections (behind NAT) dials the previous one too
        sides = (self.k + 1,) if cfg.reachable else (self.k + 1, self.k - 1)
        for stage in sides:
            for peer, rec in self.records.get(stage, {}).items():
                usable = rec.state is not NodeState.draining and rec.dialable
                usable = usable and self.peers.guard.banned(peer) is None
                if usable and not self.presumed_dead(peer) and not self.peers.has_live(peer):
                    self.peers.dial_in_background(rec.address, cfg.connect_timeout_s, stage, peer)
                elif not rec.dialable and rec.address == DIAL_OUT_ONLY and not cfg.reachable:
                    self.peers.warn_unlinkable(peer, stage)

    async def _check_move(self) -> None:
        """The coordinator's rebalancing: a move request for us -> drain, then restart serving
        the new stage (process.py re-executes the node; the Join sends it there)."""
        if self.moving or not self.status().synced:
            return
        move = (await self.swarm.moves(self.cfg.coordinator_id)).get(self.node_id)
        stages = self.cfg.model.n_stages
        if move is not None and move.from_stage == self.k and self.k != move.to_stage < stages:
            log.warning(
                "stage %d: the coordinator moves this node to stage %d", self.k, move.to_stage
            )
            self.moving = True
            self.on_move(move.to_stage)

    # ---- joining -------------------------------------------------------------------------
    async def initial_sync(
        self,
        try_download: Callable[[], Any],
        load_checkpoint: Callable[[Path], Any],
        stopping: asyncio.Event,
    ) -> Placement:
        """Decide where this node's state comes from before it takes any work.
        `try_download()` (async): a replica's state, taken by the node; True if it took.
        `load_checkpoint(path)` (async): the stage's step from a checkpoint, loaded."""
        if not self.dynamic:
            return Placement()
        await self._await_replicas()
        mine = self._others()
        online = [r for r in mine.values() if r.state is NodeState.online]
        swarm_step = await self._swarm_step()
        if swarm_step > 0 and online and await try_download():
            return Placement(downloaded=True)
        behind = swarm_step > self.status().step
        got = (
            await self._from_checkpoint(swarm_step, load_checkpoint)
            if behind and not online
            else None
        )
        if got is not None:
            return got
        if swarm_step > self.status().step:
            log.warning(
                "stage %d: the swarm is at step %d and no replica or checkpoint of this stage "
                "could be loaded; waiting for one (never training from scratch)",
                self.k,
                swarm_step,
            )
            while not stopping.is_set() and not await try_download():
                await self.refresh()
                alive = any(r.state is NodeState.online for r in self._others().values())
                if not alive:
                    got = await self._from_checkpoint(swarm_step, load_checkpoint)
                    if got is not None:
                        return got
                await asyncio.sleep(5)
            return Placement(downloaded=True)
        # a fresh swarm: every replica starts from the same seeded weights
        first = self.k == 0
        if first and not mine:  # alone? look again: two stage-0 replicas starting at
            await asyncio.sleep(2 * self.cfg.refresh_s)  # once must not both dispatch every id
            await self.refresh()
            mine = self._others()
        synced = not (first and mine)  # several stage-0 replicas: a bootstrap round
        group0 = [(self.node_id, 1.0)] if first and synced else None
        return Placement(synced=synced, group0=group0)

    async def _await_replicas(self, timeout_s: float = 30.0) -> None:
        """With --replicas-hint R, give the stage's other replicas a moment to show up, so that
        replicas launched together start together (a late one would have to sync first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.records.get(self.k, {})) < self.cfg.replicas_hint and loop.time() < deadline:
            if await self._swarm_step() > 0:
                return  # a running swarm: joining it is the normal path
            await asyncio.sleep(min(0.5, self.cfg.refresh_s))
            await self.refresh()

    def _others(self) -> dict[str, NodeRecord]:
        return {p: r for p, r in self.records.get(self.k, {}).items() if p != self.node_id}

    async def _swarm_step(self) -> int:
        smap = await self.swarm.swarm_map(self.cfg.model.n_stages)
        steps = [r.step for recs in smap.values() for r in recs.values()]
        return max(steps, default=0)

    async def download(self, averager, executor) -> tuple[dict, list] | None:
        """A replica's state (meta, tensors) whose digest replicas vouch for, or None after
        SYNC_ATTEMPTS rounds of asking the vouchers, or the whole time allowed for that
        (node/protocol/vouching.py). The vouches are collected every refresh while a state
        downloads: one spans many steps, and a record shows only its last few. A refused
        state is logged and counted (`bad_state`), and the next voucher asked."""
        if averager is None or not self.dynamic:
            return None
        loop = asyncio.get_running_loop()
        # the whole call, and a rate for the bytes: a large stage may take minutes
        timeout_s = self.cfg.state_timeout_s + self.max_state_bytes / MIN_STATE_RATE
        deadline = loop.time() + 3 * timeout_s
        vouches = Vouches(self.node_id)
        collector = asyncio.create_task(self._collect_every(vouches), name="vouches")
        try:
            for attempt in range(SYNC_ATTEMPTS):
                await self._collect(vouches)
                for donor in vouches.donors()[:MAX_DONORS]:
                    if loop.time() > deadline:
                        return None
                    args = (donor.averager, timeout_s, self.max_state_bytes, self.max_tensors)
                    got = await loop.run_in_executor(executor, averager.load_state_from, *args)
                    why = got if isinstance(got, str) else await self._judge(vouches, got, executor)
                    if why is None:
                        return got
                    self.peers.errors["bad_state"] += 1
                    log.warning(
                        "stage %d: refused the state of %s: %s", self.k, donor.node, printable(why)
                    )
                await asyncio.sleep(1.0 + attempt)
            return None
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    async def _collect_every(self, vouches: Vouches) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            with contextlib.suppress(Exception):  # best effort: the next refresh tries again
                await self._collect(vouches)

    async def _judge(self, vouches: Vouches, got, executor) -> str | None:
        """None if replicas vouch for the downloaded state, else why not. Records lag (a
        replica announces each refresh): a state nobody contradicts yet is waited on."""
        loop = asyncio.get_running_loop()
        try:
            step, digest = await loop.run_in_executor(executor, snapshot_digest, *got)
        except ValueError as err:
            return str(err)
        deadline = loop.time() + 3 * self.cfg.refresh_s + 2.0
        while True:
            await self._collect(vouches)
            verdict = vouches.verdict(step, digest)
            if verdict == OK:
                got[0]["vouched"] = digest  # the machine checks what it loaded against it
                return None
            if verdict != WAIT:
                return verdict
            if loop.time() > deadline:
                need = vouches.need()
                return f"fewer than {need} replicas vouch for its state of step {step}"
            await asyncio.sleep(self.cfg.refresh_s)

    async def _collect(self, vouches: Vouches) -> None:
        """Add what the stage's records vouch for now (the last view if the DHT fails)."""
        try:
            recs = await self.swarm.stage_members(self.k, strict=True)
        except DHTUnavailable:
            recs = self.records.get(self.k, {})
        vouches.add({p: r for p, r in recs.items() if r.config_hash == self.fingerprint})

    async def _from_checkpoint(self, swarm_step: int, load_checkpoint) -> Placement | None:
        if self.cfg.checkpoint_dir is None:
            return None  # only our own directory is ever read (records carry no paths)
        path = Path(self.cfg.checkpoint_dir)
        place = checkpoint_place(path, self.cfg.swarm)
        records = await self.swarm.checkpoints(self.k)
        for rec in sorted(records.values(), key=lambda r: -r.step):
            files = (checkpoint.STAGE_FILE, checkpoint.PREVIOUS_FILE)  # load_stage takes either
            if rec.place != place or not any((path / f.format(k=self.k)).is_file() for f in files):
                continue
            step = await load_checkpoint(path)
            log.warning(
                "stage %d: no replica left: resumed from the checkpoint of step %d at %s "
                "(the swarm is at step %d)",
                self.k,
                step,
                path,
                swarm_step,
            )
            first = self.k == 0
            return Placement(
                step=max(step, swarm_step),
                group0=[(self.node_id, 1.0)] if first else None,
                hold=first,
                checkpoint=step,
            )
        return None

    async def announce_checkpoint(self) -> None:
        if not self.dynamic or not self.cfg.checkpoint_dir:
            return
        record = CheckpointRecord(
            peer_id=self.node_id,
            place=checkpoint_place(self.cfg.checkpoint_dir, self.cfg.swarm),
            step=self.status().step,
        )
        await self.swarm.announce_checkpoint(self.k, record, ttl_s=24 * 3600)
