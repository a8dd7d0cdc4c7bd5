"""#10 H1/H6/M1: a stranger in the DHT writes under another node's id. Before, anyone could store
a tombstone for a victim (it vanished from every view), mark it draining, give it a far step
(its replicas resynced), or point its checkpoint record anywhere. Now a record under a node id
is sealed by that node's key (node/swarm/owned.py); two real hivemind DHT peers on loopback."""

from __future__ import annotations

import asyncio

import pytest

from common.identity import Identity
from node.swarm.dht import SwarmDHT, dht_now, start_dht, visible_maddrs
from node.swarm.owned import seal
from node.swarm.records import (
    CheckpointRecord,
    checkpoint_key,
    joins_key,
    moves_key,
    stage_key,
)
from tests.helpers import key, nid
from tests.loopback.test_coordinator import online

SWARM = "owned-records"


async def store(dht, k: str, value, expiration: float, subkey: str | None) -> bool:
    """A raw store, as any DHT peer can make one (the stranger's own validator is bypassed by
    storing what it likes: it still has to get past the honest peers')."""
    return bool(
        await asyncio.wait_for(
            dht.store(k, value, expiration, subkey=subkey, return_future=True), 10
        )
    )


async def raw_get(dht, k: str):
    found = await asyncio.wait_for(dht.get(k, latest=True, return_future=True), 10)
    return {} if found is None else found.value


async def test_h1_no_stranger_writes_under_a_nodes_id(dhts):
    honest, stranger = dhts
    victim = SwarmDHT(honest, SWARM, 5.0, identity=key("victim"))
    record = online("victim", 2.0, step=3)
    assert await victim.announce(1, record, 60)
    ckpt = CheckpointRecord(peer_id=nid("victim"), place="0123456789abcdef", step=2)
    assert await victim.announce_checkpoint(1, ckpt, 60)
    k, far = stage_key(SWARM, 1), dht_now() + 600
    forged = {**record.model_dump(mode="json"), "state": "draining", "step": 10**6}
    mallory = Identity.generate()
    sealed = (await raw_get(honest, k))[nid("victim")]  # the victim's own value, as stored

    attempts = {
        "an unsealed tombstone": (k, None, far),
        "an unsealed record": (k, forged, far),
        "a record sealed by another key": (k, seal(mallory, k, forged, far), far),
        "the victim's own record with a later expiry": (k, sealed.value, far),
        "the victim's own record under another stage": (
            stage_key(SWARM, 0),
            sealed.value,
            sealed.expiration_time,
        ),
        "a checkpoint record pointing elsewhere": (
            checkpoint_key(SWARM, 1),
            {"peer_id": nid("victim"), "place": "fedcba9876543210", "step": 99},
            far,
        ),
    }
    for what, (where, value, exp) in attempts.items():
        assert not await store(stranger, where, value, exp, nid("victim")), what

    for dht in (honest, stranger):  # whoever reads, through either peer
        view = SwarmDHT(dht, SWARM, 5.0)
        assert await view.stage_members(1) == {nid("victim"): record}
        assert await view.stage_members(0) == {}
        assert await view.checkpoints(1) == {nid("victim"): ckpt}

    # the victim itself can withdraw (a sealed tombstone)
    assert await victim.withdraw(1, nid("victim"), 60)
    assert await SwarmDHT(stranger, SWARM, 5.0).stage_members(1) == {}


GUARDED = "guarded-records"


@pytest.fixture(scope="module")
def guarded():
    """An honest DHT peer guarding GUARDED's keys, and a stranger's peer that guards nothing
    (it stores whatever it is sent, its own writes included)."""
    honest = start_dht([], swarm=GUARDED)
    stranger = start_dht(visible_maddrs(honest))
    yield honest, stranger
    stranger.shutdown()
    honest.shutdown()


async def test_h1_a_plain_value_cannot_replace_a_stages_records(guarded):
    """hivemind keeps whichever value of a key expires last, a plain value over a dictionary of
    subkeys too: one stored with a far expiry hid every node of a stage (review). The honest
    peer guards the swarm's node-owned keys whole, and refuses a far expiry on the
    coordinator's keys (a move kept open for ever stopped rebalancing)."""
    honest, stranger = guarded
    victim = SwarmDHT(honest, GUARDED, 5.0, identity=key("victim"))
    record = online("victim", 2.0, step=3)
    assert await victim.announce(1, record, 60)
    far = dht_now() + 10**6
    placeholder = {**online("ghost", 0.0).model_dump(mode="json"), "state": "joining"}
    move = {"peer_id": nid("victim"), "from_stage": 1, "to_stage": 0}
    for where, value, subkey in (
        (stage_key(GUARDED, 1), b"wiped", None),
        (stage_key(GUARDED, 1), None, None),
        (stage_key(GUARDED, 1), {"any": 1}, "not-a-node-id"),
        (checkpoint_key(GUARDED, 1), b"wiped", None),
        (joins_key(GUARDED, 0), placeholder, "join/" + nid("ghost")),
        (moves_key(GUARDED), move, "move/" + nid("victim")),
    ):
        await store(stranger, where, value, far, subkey)  # its own peer takes anything
    honest_view = SwarmDHT(honest, GUARDED, 5.0)
    assert await honest_view.stage_members(1) == {nid("victim"): record}
    assert await honest_view.placeholders(0, nid("ghost")) == {}
    assert await honest_view.moves(nid("victim")) == {}
    newer = online("victim", 2.0, step=4)
    await victim.announce(1, newer, 60)  # (True or False: whichever peer answers first)
    assert await honest_view.stage_members(1) == {nid("victim"): newer}
