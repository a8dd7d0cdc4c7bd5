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

from common.identity import Identity
from common.identity import is_node_id as is_owned
from common.reaper import start_reaper
from node.swarm.manifest import ManifestConflict
from node.swarm.p2p_key import averager_binds, key_file
from node.swarm.records import (
    PENDING_ADDRESS,
    CheckpointRecord,
    Manifest,
    MoveRecord,
    NodeRecord,
    NodeState,
    Placeholder,
    checkpoint_key,
    joins_key,
    manifest_key,
    moves_key,
    parse_checkpoint_records,
    parse_joins,
    parse_manifest,
    parse_moves,
    parse_stage_records,
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
    identity: Identity | None = None,
):
    """A running hivemind DHT node. Forks its own child: call before torch compute and gRPC.
    `token`: a private swarm's; its records are then HMAC-gated (see node.swarm.gating).
    `client_mode`: behind NAT: it stores and reads, serves no one (nobody could reach it), and
    the stage's averager, which follows the DHT's mode, averages as a client.
    `swarm`: the swarm whose node-owned keys this DHT guards whole (node/swarm/owned.py).
    `identity`: a node's key, which becomes its peer id's (node/swarm/p2p_key.py: a stage's
    averager needs it); without one, a random peer id (a coordinator, a reader)."""
    import hivemind  # heavy; only processes that join a swarm pay for it

    from node.swarm.owned import OwnerValidator

    validators = [OwnerValidator(swarm)]  # records under a node id: only that node's (owned.py)
    if token:
        from node.swarm.gating import TokenRecordValidator

        validators.append(TokenRecordValidator(token))
    with contextlib.ExitStack() as stack:
        keyed = {}
        if identity is not None:  # the daemon reads the file as it starts; gone after
            keyed = {"identity_path": stack.enter_context(key_file(identity))}
            keyed["check_if_identity_free"] = False  # a restart under its key would wait
        with forking():
            return hivemind.DHT(
                initial_peers=list(initial_peers),
                host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
                start=True,
                record_validators=validators,
                client_mode=client_mode,
                **keyed,
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
    async def _get(
        self, key: str, strict: bool = False, sealed: bool = False, only: str | None = None
    ) -> Any:
        """The value under `key`; subkeyed: {subkey: value}. `sealed`: node-owned records,
        each opened (owner's signature checked, owned.py); others under that key are dropped.
        `only`: that signer's record alone (a stranger's many records under the key neither
        push it out of the read cap nor cost a signature check each: review)."""
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
            if only is not None:
                value = {only: value[only]} if only in value else {}
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
    async def get_manifest(
        self, strict: bool = False, signer: str | None = None
    ) -> Manifest | None:
        """The swarm's manifest, or None if there is none. A manifest is sealed by whoever
        stored it (the coordinator, or the node that started the swarm), under its id:
        anyone can store one (#10 M1). `signer`: the id this process pinned (the coordinator's,
        from its Join answer, or `coordinator_id`): only its manifest counts. Without one, the
        manifests there must agree, else ManifestConflict. strict: raise DHTUnavailable when
        the DHT does not answer (so a process never takes "no answer" for "a new swarm" and
        stores its own manifest over the swarm's)."""
        raw = await self._get(manifest_key(self.swarm), strict, sealed=True, only=signer)
        found = raw if isinstance(raw, dict) else {}
        if signer is not None:
            return parse_manifest(found.get(signer))
        if len(found) >= MAX_RECORDS:  # a flood: the honest one may be past the read cap
            raise ManifestConflict(
                f"swarm {self.swarm!r} has {len(found)}+ manifests in the DHT: set "
                "coordinator_id (--coordinator-id), or join via its --coordinator"
            )
        # what must agree is what check_manifest compares (not a version's patch level, nor
        # where the data is fetched from: it is checked against the fingerprint)
        manifests = {(m.fingerprint, m.steps): m for m in map(parse_manifest, found.values()) if m}
        if len(manifests) > 1:
            raise ManifestConflict(
                f"swarm {self.swarm!r} has {len(manifests)} different manifests in the DHT "
                f"(signed by {', '.join(sorted(found))[:300]}): set coordinator_id "
                "(--coordinator-id) to the one whose swarm you mean, or join via its --coordinator"
            )
        return next(iter(manifests.values()), None)

    async def manifests(self) -> dict[str, Manifest]:
        """Every sealed manifest of the swarm, by signer (the coordinator checks its own config
        against those, whoever signed them)."""
        raw = await self._get(manifest_key(self.swarm), sealed=True)
        found = raw if isinstance(raw, dict) else {}
        return {s: m for s, m in ((s, parse_manifest(v)) for s, v in found.items()) if m}

    async def put_manifest(self, manifest: Manifest, ttl_s: float = 600.0) -> bool:
        """Store (or refresh) the manifest, sealed by our key under our id. Callers check the
        stored one first: see join()."""
        # without unset optional fields (a reader of another version that can open the seal
        # parses it, and refuses by version; 0.6 readers cannot: they find no manifest)
        record = manifest.model_dump(exclude_none=True)
        return await self._store_sealed(manifest_key(self.swarm), record, ttl_s)

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
        # a record vouches for states only from its own node's averager (p2p_key.py)
        unbound = {"averager": None, "vouches": []}
        return {
            p: r
            if r.averager is None or averager_binds(p, r.averager)
            else r.model_copy(update=unbound)
            for p, r in parse_stage_records(raw, stage).items()
        }

    # ---- joins (the coordinator's placeholders) ------------------------------------------
    async def announce_placeholders(self, stage: int, joins: list[Placeholder]) -> bool:
        """The coordinator's placeholders of `stage` (joiners it placed, so the next Join sees
        them before the nodes announce themselves), sealed by its key under its id: anyone
        could write one before, and fake ones steered placement (#10 H6). The record lives as
        long as its newest placeholder."""
        payload = {"joins": [j.model_dump(mode="json") for j in joins]}
        ttl_s = max((j.until for j in joins), default=dht_now()) - dht_now()
        return await self._store_sealed(joins_key(self.swarm, stage), payload, max(ttl_s, 1.0))

    async def placeholders_of(self, stage: int, coordinator: str | None) -> list[Placeholder]:
        """`coordinator`'s live placeholders of `stage`. What one may say is only: a node
        joining, at no address, at step 0, under a derived node id."""
        if coordinator is None:
            return []
        raw = await self._get(joins_key(self.swarm, stage), sealed=True, only=coordinator)
        now = dht_now()
        return [
            j
            for j in parse_joins(raw.get(coordinator) if isinstance(raw, dict) else None, stage)
            if j.until > now and j.record.state is NodeState.joining
            and j.record.address == PENDING_ADDRESS and j.record.step == 0
            and is_owned(j.record.peer_id)
        ]  # fmt: skip

    async def placeholders(self, stage: int, coordinator: str | None) -> dict[str, NodeRecord]:
        """`coordinator`'s live placeholders of `stage`, by node id."""
        return {j.record.peer_id: j.record for j in await self.placeholders_of(stage, coordinator)}

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
    async def announce_moves(self, moves: list[MoveRecord], ttl_s: float) -> bool:
        """The coordinator's open move requests, all of them, sealed by its key under its id
        (they expire after `ttl_s`). Forged moves made any node drain and restart (#10 M1)."""
        payload = {"moves": [m.model_dump() for m in moves]}
        return await self._store_sealed(moves_key(self.swarm), payload, ttl_s)

    async def moves(self, coordinator: str | None) -> dict[str, MoveRecord]:
        """The open move requests of `coordinator` (the id this process pinned), by node id;
        none without one: anyone can store moves under its own id, only the coordinator's
        count."""
        if coordinator is None:
            return {}
        raw = await self._get(moves_key(self.swarm), sealed=True, only=coordinator)
        return parse_moves(raw.get(coordinator) if isinstance(raw, dict) else None)


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
