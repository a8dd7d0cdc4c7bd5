"""A swarm's view of hivemind's DHT: the manifest, stage membership and checkpoint locations.

Every call has a timeout and none raises on a slow or partitioned DHT: reads return what could be
read (possibly nothing), writes report success. Records are parsed by `records` as untrusted input.
The hivemind.DHT itself is created by the caller (it forks: create it first in a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

from common.reaper import start_reaper
from node.swarm.records import (
    CheckpointRecord,
    Manifest,
    MoveRecord,
    NodeRecord,
    checkpoint_key,
    manifest_key,
    moves_key,
    parse_checkpoint_records,
    parse_manifest,
    parse_stage_records,
    parse_subkeyed,
    stage_key,
)

log = logging.getLogger(__name__)


def start_dht(
    initial_peers: list[str],
    host_maddrs: list[str] | None = None,
    token: str | None = None,
    client_mode: bool = False,
):
    """A running hivemind DHT node. Forks its own child: call before torch compute and gRPC.
    `token`: a private swarm's; its records are then HMAC-gated (see node.swarm.gating).
    `client_mode`: behind NAT: it stores and reads, serves no one (nobody could reach it), and
    the stage's averager, which follows the DHT's mode, averages as a client."""
    import hivemind  # heavy; only processes that join a swarm pay for it

    validators = []
    if token:
        from node.swarm.gating import TokenRecordValidator

        validators.append(TokenRecordValidator(token))
    with forking():
        return hivemind.DHT(
            initial_peers=list(initial_peers),
            host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
            start=True,
            record_validators=validators,
            client_mode=client_mode,
        )


@contextlib.contextmanager
def forking():
    """Around code that forks a hivemind child (a DHT, an averager). The child inherits every
    object of this process; if its garbage collector later frees one that belonged to gRPC or
    torch threads, which do not exist in the child, it can crash or hang (seen: a DHT child
    segfaulting in a collection, in a test process that had run gRPC servers before). So:
    collect here, where it is safe, freeze what is left so the child never collects it, and
    unfreeze once the fork is done. Plus warm ABC caches (see warm_abc_caches), and start this
    process's reaper (common/reaper.py): hivemind's children must not outlive a SIGKILLed us."""
    start_reaper()
    warm_abc_caches()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def warm_abc_caches() -> None:
    """hivemind's routing table asks `isinstance(dht_id, collections.abc.Iterable)` on every
    distance. In a process that made many classes (a long-lived node, a test session), the first
    such check walks Iterable's whole subclass tree; done first in the forked child, over and
    over while its cache is cold, it kept a DHT from starting for minutes. Asked here, before
    the fork, the child inherits the answer."""
    from collections.abc import Iterable

    from hivemind.dht.routing import DHTID

    isinstance(DHTID.generate(), Iterable)


def visible_maddrs(dht) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def dht_now() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


class DHTUnavailable(RuntimeError):
    """The DHT did not answer in time (not the same as "the key is absent")."""


class SwarmDHT:
    def __init__(self, dht, swarm: str, timeout_s: float = 10.0):
        self.dht, self.swarm, self.timeout_s = dht, swarm, timeout_s

    # ---- raw -----------------------------------------------------------------------------
    async def _get(self, key: str, strict: bool = False) -> Any:
        try:
            found = await asyncio.wait_for(
                self.dht.get(key, latest=True, return_future=True), self.timeout_s
            )
        except (TimeoutError, Exception) as err:  # a DHT that does not answer is "no data"
            log.warning("DHT get %s failed: %s", key, err or type(err).__name__)
            if strict:  # ...unless the caller must tell "absent" from "unknown"
                raise DHTUnavailable(f"the DHT did not answer for {key}: {err!r}") from None
            return None
        if found is None:
            return None
        value = found.value
        if isinstance(value, dict):  # subkeyed: {subkey: ValueWithExpiration}
            return {sk: getattr(v, "value", v) for sk, v in value.items()}
        return value

    async def _store(self, key: str, value: Any, ttl_s: float, subkey: str | None = None) -> bool:
        try:
            return bool(
                await asyncio.wait_for(
                    self.dht.store(
                        key, value, dht_now() + ttl_s, subkey=subkey, return_future=True
                    ),
                    self.timeout_s,
                )
            )
        except (TimeoutError, Exception) as err:
            log.warning("DHT store %s failed: %s", key, err or type(err).__name__)
            return False

    # ---- manifest ------------------------------------------------------------------------
    async def get_manifest(self, strict: bool = False) -> Manifest | None:
        """The swarm's manifest, or None if there is none. strict: raise DHTUnavailable when
        the DHT does not answer (so a process never takes "no answer" for "a new swarm" and
        stores its own manifest over the swarm's)."""
        return parse_manifest(await self._get(manifest_key(self.swarm), strict))

    async def put_manifest(self, manifest: Manifest, ttl_s: float = 600.0) -> bool:
        """Store (or refresh) the manifest. Callers check the stored one first: see join()."""
        # without unset optional fields: a node of the previous version parses it, and is then
        # refused by version ("install resbm X") rather than taking it for garbage
        record = manifest.model_dump(exclude_none=True)
        return await self._store(manifest_key(self.swarm), record, ttl_s)

    # ---- membership ----------------------------------------------------------------------
    async def announce(self, stage: int, record: NodeRecord, ttl_s: float) -> bool:
        return await self._store(
            stage_key(self.swarm, stage), record.model_dump(mode="json"), ttl_s, record.peer_id
        )

    async def withdraw(self, stage: int, peer_id: str, ttl_s: float) -> bool:
        """Remove our record now rather than at its expiry: a tombstone (None) that outlives it
        (the DHT keeps whichever value expires last). `ttl_s`: what the record was stored with."""
        return await self._store(stage_key(self.swarm, stage), None, ttl_s + 1.0, peer_id)

    async def stage_members(self, stage: int, strict: bool = False) -> dict[str, NodeRecord]:
        """`strict`: raise DHTUnavailable when the DHT does not answer (else: no members)."""
        raw = await self._get(stage_key(self.swarm, stage), strict=strict)
        if isinstance(raw, dict):
            raw = {sk: v for sk, v in raw.items() if v is not None}  # tombstones
        return parse_stage_records(raw, stage)

    async def swarm_map(self, n_stages: int) -> dict[int, dict[str, NodeRecord]]:
        maps = await asyncio.gather(*(self.stage_members(k) for k in range(n_stages)))
        return dict(enumerate(maps))

    # ---- checkpoints ---------------------------------------------------------------------
    async def announce_checkpoint(self, stage: int, record: CheckpointRecord, ttl_s: float) -> bool:
        return await self._store(
            checkpoint_key(self.swarm, stage), record.model_dump(), ttl_s, record.peer_id
        )

    async def checkpoints(self, stage: int) -> dict[str, CheckpointRecord]:
        return parse_checkpoint_records(await self._get(checkpoint_key(self.swarm, stage)), stage)

    # ---- moves (the coordinator's rebalancing) -------------------------------------------
    async def announce_move(self, record: MoveRecord, ttl_s: float) -> bool:
        """Ask node `record.peer_id` to move (stored under its id; it expires after `ttl_s`)."""
        return await self._store(moves_key(self.swarm), record.model_dump(), ttl_s, record.peer_id)

    async def moves(self) -> dict[str, MoveRecord]:
        """The open move requests, by node id."""
        raw = await self._get(moves_key(self.swarm))
        if isinstance(raw, dict):
            raw = {sk: v for sk, v in raw.items() if v is not None}  # tombstones
        return parse_subkeyed(raw, MoveRecord, "moves")
