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
from collections import OrderedDict
from typing import Any

from common.identity import is_node_id as is_owned
from common.reaper import start_reaper
from node.swarm.records import (
    PENDING_ADDRESS,
    CheckpointRecord,
    Manifest,
    MoveRecord,
    NodeRecord,
    NodeState,
    checkpoint_key,
    joins_key,
    manifest_key,
    moves_key,
    parse_checkpoint_records,
    parse_manifest,
    parse_stage_records,
    parse_subkeyed,
    stage_key,
)

log = logging.getLogger(__name__)
MAX_RECORDS = 4096  # node-owned records read under one key, at most


def start_dht(
    initial_peers: list[str],
    host_maddrs: list[str] | None = None,
    token: str | None = None,
    client_mode: bool = False,
    swarm: str | None = None,
):
    """A running hivemind DHT node. Forks its own child: call before torch compute and gRPC.
    `token`: a private swarm's; its records are then HMAC-gated (see node.swarm.gating).
    `client_mode`: behind NAT: it stores and reads, serves no one (nobody could reach it), and
    the stage's averager, which follows the DHT's mode, averages as a client.
    `swarm`: the swarm whose node-owned keys this DHT guards whole (node/swarm/owned.py)."""
    import hivemind  # heavy; only processes that join a swarm pay for it

    from node.swarm.owned import OwnerValidator

    validators = [OwnerValidator(swarm)]  # records under a node id: only that node's (owned.py)
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
    """`identity`: the node's key, which seals what it stores under its id (node/swarm/owned.py);
    a reader (the coordinator, `resbm export`) needs none."""

    def __init__(self, dht, swarm: str, timeout_s: float = 10.0, identity=None):
        self.dht, self.swarm, self.timeout_s = dht, swarm, timeout_s
        self.identity = identity

    # ---- raw -----------------------------------------------------------------------------
    async def _get(self, key: str, strict: bool = False, sealed: bool = False) -> Any:
        """The value under `key`; subkeyed: {subkey: value}. `sealed`: node-owned records,
        each opened (owner's signature checked, owned.py); others under that key are dropped."""
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
        if isinstance(value, dict) and sealed:
            return _open_all(key, value)
        if isinstance(value, dict):  # subkeyed: {subkey: ValueWithExpiration}
            return {sk: getattr(v, "value", v) for sk, v in value.items()}
        return None if sealed else value

    async def _store(
        self, key: str, value: Any, ttl_s: float, subkey: str | None = None, expiration=None
    ) -> bool:
        expiration = dht_now() + ttl_s if expiration is None else expiration
        try:
            return bool(
                await asyncio.wait_for(
                    self.dht.store(key, value, expiration, subkey=subkey, return_future=True),
                    self.timeout_s,
                )
            )
        except (TimeoutError, Exception) as err:
            log.warning("DHT store %s failed: %s", key, err or type(err).__name__)
            return False

    async def _store_sealed(self, key: str, payload: Any, ttl_s: float) -> bool:
        """Store `payload` under (`key`, our node id), sealed by our key (owned.py)."""
        from node.swarm.owned import seal

        if self.identity is None:
            raise RuntimeError("storing a node's record needs its identity (SwarmDHT(identity=))")
        expiration = dht_now() + ttl_s  # the seal covers it: stored with exactly this one
        value = seal(self.identity, key, payload, expiration)
        return await self._store(key, value, ttl_s, self.identity.node_id, expiration)

    def _mine(self, peer_id: str) -> None:
        if self.identity is None or peer_id != self.identity.node_id:
            raise ValueError(f"a node stores only its own records, not {peer_id!r}'s")

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
        self._mine(record.peer_id)
        return await self._store_sealed(
            stage_key(self.swarm, stage), record.model_dump(mode="json"), ttl_s
        )

    async def withdraw(self, stage: int, peer_id: str, ttl_s: float) -> bool:
        """Remove our record now rather than at its expiry: a tombstone (None) that outlives it
        (the DHT keeps whichever value expires last). `ttl_s`: what the record was stored with."""
        self._mine(peer_id)
        return await self._store_sealed(stage_key(self.swarm, stage), None, ttl_s + 1.0)

    async def stage_members(self, stage: int, strict: bool = False) -> dict[str, NodeRecord]:
        """`strict`: raise DHTUnavailable when the DHT does not answer (else: no members)."""
        raw = await self._get(stage_key(self.swarm, stage), strict=strict, sealed=True)
        if isinstance(raw, dict):
            raw = {sk: v for sk, v in raw.items() if v is not None}  # tombstones
        return parse_stage_records(raw, stage)

    # ---- joins (the coordinator's placeholders) ------------------------------------------
    async def announce_placeholder(self, stage: int, record: NodeRecord, ttl_s: float) -> bool:
        """A joiner's placeholder, so the next Join sees it before the node announces itself.
        Under its own key: the coordinator cannot seal a record under the node's id."""
        key, value = joins_key(self.swarm, stage), record.model_dump(mode="json")
        return await self._store(key, value, ttl_s, f"join/{record.peer_id}")

    async def placeholders(self, stage: int) -> dict[str, NodeRecord]:
        """Anyone in the DHT can write here (the coordinator's key is not pinned yet: #10 M1),
        so only what a placeholder says is taken: a node joining, at no address."""
        raw = await self._get(joins_key(self.swarm, stage))
        found = parse_subkeyed(raw, NodeRecord, f"stage {stage} joins", prefix="join/")
        return {
            p: r
            for p, r in found.items()
            if r.state is NodeState.joining and r.address == PENDING_ADDRESS and r.step == 0
            and is_owned(p)  # a node id a key can prove, as every node's now is
        }  # fmt: skip

    async def swarm_map(self, n_stages: int) -> dict[int, dict[str, NodeRecord]]:
        maps = await asyncio.gather(*(self.stage_members(k) for k in range(n_stages)))
        return dict(enumerate(maps))

    # ---- checkpoints ---------------------------------------------------------------------
    async def announce_checkpoint(self, stage: int, record: CheckpointRecord, ttl_s: float) -> bool:
        self._mine(record.peer_id)
        return await self._store_sealed(
            checkpoint_key(self.swarm, stage), record.model_dump(), ttl_s
        )

    async def checkpoints(self, stage: int) -> dict[str, CheckpointRecord]:
        raw = await self._get(checkpoint_key(self.swarm, stage), sealed=True)
        return parse_checkpoint_records(raw, stage)

    # ---- moves (the coordinator's rebalancing) -------------------------------------------
    async def announce_move(self, record: MoveRecord, ttl_s: float) -> bool:
        """Ask node `record.peer_id` to move (stored under its id; it expires after `ttl_s`)."""
        key, subkey = moves_key(self.swarm), f"move/{record.peer_id}"  # not sealed: see owned.py
        return await self._store(key, record.model_dump(), ttl_s, subkey)

    async def moves(self) -> dict[str, MoveRecord]:
        """The open move requests, by node id."""
        raw = await self._get(moves_key(self.swarm))
        if isinstance(raw, dict):
            raw = {sk: v for sk, v in raw.items() if v is not None}  # tombstones
        moves = parse_subkeyed(raw, MoveRecord, "moves", prefix="move/")
        return {p: m for p, m in moves.items() if is_owned(p)}


def _open_all(key: str, found: dict) -> dict[str, Any]:
    """{subkey: ValueWithExpiration} of node-owned records -> {node id: payload}, each checked
    against its owner's seal in this process too (owned.py); what fails is logged and dropped."""
    from node.swarm.owned import SealError, open_sealed

    out: dict[str, Any] = {}
    owned = [(sk, item) for sk, item in found.items() if is_owned(sk)]  # then cap (review)
    for subkey, item in owned[:MAX_RECORDS]:
        try:
            out[subkey] = _opened(key, subkey, item.value, item.expiration_time, open_sealed)
        except (SealError, Exception) as err:
            log.warning("%s: dropped a record under %s: %s", key, subkey, err)
    return out


_OPENED: OrderedDict[tuple, Any] = OrderedDict()  # a seal checked once is not checked again


def _opened(key: str, subkey: str, value: Any, expiration: float, open_sealed) -> Any:
    """open_sealed, remembered: a stranger's many records, read at every refresh, cost one
    signature check each, not one per read (a check is ~0.25 ms: review)."""
    sig = value.get("sig") if isinstance(value, dict) else None
    memo = (key, subkey, sig, expiration) if isinstance(sig, bytes) else None
    if memo is not None and memo in _OPENED:
        _OPENED.move_to_end(memo)
        return _OPENED[memo]
    payload = open_sealed(key, subkey, value, expiration)
    if memo is not None:
        _OPENED[memo] = payload
        while len(_OPENED) > MAX_RECORDS:
            _OPENED.popitem(last=False)
    return payload
