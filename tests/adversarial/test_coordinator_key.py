"""#10 M1: the coordinator's word in the DHT. Before, a move record was a plain value anyone could
store under `move/<victim>` (the victim drained and restarted), and the manifest a plain value a
stranger could overwrite with a later expiry (newcomers took its settings). Now both are sealed by
the coordinator's key under its id, and a node takes only the coordinator it pinned (its Join
answer's, or `coordinator_id`). Two real hivemind DHT peers on loopback: an honest one guarding
the swarm's keys, and a stranger's that stores anything."""

from __future__ import annotations

import pytest

from common.identity import Identity
from node.swarm.dht import SwarmDHT, dht_now, start_dht, visible_maddrs
from node.swarm.manifest import ManifestConflict
from node.swarm.owned import seal
from node.swarm.records import Manifest, MoveRecord, manifest_key, moves_key
from node.version import VERSION
from tests.adversarial.test_records import store
from tests.helpers import nid

SWARM = "pinned-coordinator"


@pytest.fixture(scope="module")
def dhts():
    honest = start_dht([], swarm=SWARM)
    stranger = start_dht(visible_maddrs(honest))  # guards nothing
    yield honest, stranger
    stranger.shutdown()
    honest.shutdown()


def manifest(steps: int) -> Manifest:
    return Manifest(swarm=SWARM, fingerprint="0123456789abcdef", version=VERSION, settings={},
                    steps=steps)  # fmt: skip


async def test_m1_only_the_pinned_coordinators_moves_count(dhts):
    honest, stranger = dhts
    coordinator, mallory = Identity.generate(), Identity.generate()
    real = MoveRecord(peer_id=nid("a"), from_stage=0, to_stage=1)
    assert await SwarmDHT(honest, SWARM, 5.0, coordinator).announce_moves([real], 60)
    forged = {"moves": [{"peer_id": nid("victim"), "from_stage": 1, "to_stage": 0}]}
    k, soon = moves_key(SWARM), dht_now() + 60
    await store(stranger, k, forged, soon, None)  # a plain value over the whole key
    await store(stranger, k, forged, soon, "move/" + nid("victim"))  # the old form
    await store(stranger, k, seal(mallory, k, forged, soon), soon, coordinator.node_id)
    # and its own, sealed properly under its own id: valid, and nobody's pin
    assert await SwarmDHT(stranger, SWARM, 5.0, mallory).announce_moves(
        [MoveRecord(peer_id=nid("victim"), from_stage=1, to_stage=0)], 60
    )
    reader = SwarmDHT(honest, SWARM, 5.0)
    assert await reader.moves(coordinator.node_id) == {nid("a"): real}
    assert await reader.moves(None) == {}  # no coordinator pinned: no move is anyone's order
    assert nid("victim") in await reader.moves(mallory.node_id)  # only for whoever pins it


async def test_m1_a_strangers_manifest_neither_replaces_the_coordinators_nor_passes_unnoticed(
    dhts,
):
    honest, stranger = dhts
    coordinator, mallory = Identity.generate(), Identity.generate()
    ours, theirs = manifest(100), manifest(10**6)
    assert await SwarmDHT(honest, SWARM, 5.0, coordinator).put_manifest(ours, 60)
    k, far = manifest_key(SWARM), dht_now() + 3000
    await store(stranger, k, theirs.model_dump(), far, None)  # the old attack: a plain value
    reader = SwarmDHT(honest, SWARM, 5.0)
    assert await reader.get_manifest(signer=coordinator.node_id) == ours
    assert await reader.get_manifest() == ours  # the plain value was refused
    # a manifest sealed by the stranger's own key: valid, so an unpinned reader cannot choose
    assert await SwarmDHT(stranger, SWARM, 5.0, mallory).put_manifest(theirs, 60)
    assert await reader.get_manifest(signer=coordinator.node_id) == ours
    with pytest.raises(ManifestConflict, match="coordinator_id"):
        await reader.get_manifest()
    # one that equals the coordinator's (a node that started the swarm, say) is no conflict
    assert await SwarmDHT(stranger, SWARM, 5.0, mallory).put_manifest(ours, 60)
    assert await reader.get_manifest() == ours


async def test_h6_only_the_coordinators_own_placeholders_steer_placement(dhts):
    """A joiner's placeholder says which stage the coordinator just gave it, so the next Join
    sees it. Before, anyone could store one under `join/<any id>` and steer placement."""
    from node.swarm.records import PENDING_ADDRESS, NodeRecord, NodeState, Placeholder, joins_key

    honest, stranger = dhts
    coordinator, mallory = Identity.generate(), Identity.generate()

    def placed(name: str) -> Placeholder:
        rec = NodeRecord(
            peer_id=nid(name), address=PENDING_ADDRESS, state=NodeState.joining, throughput=9.0,
            load=0, version=VERSION, config_hash="0" * 16, step=0,
        )  # fmt: skip
        return Placeholder(record=rec, until=dht_now() + 60)

    assert await SwarmDHT(honest, SWARM, 5.0, coordinator).announce_placeholders(0, [placed("j")])
    fake = placed("ghost")
    k, soon = joins_key(SWARM, 0), dht_now() + 60
    await store(stranger, k, fake.record.model_dump(mode="json"), soon, "join/" + nid("ghost"))
    await store(stranger, k, {"joins": [fake.model_dump(mode="json")]}, soon, None)
    assert await SwarmDHT(stranger, SWARM, 5.0, mallory).announce_placeholders(0, [fake])
    reader = SwarmDHT(honest, SWARM, 5.0)
    assert set(await reader.placeholders(0, coordinator.node_id)) == {nid("j")}
    assert await reader.placeholders(0, None) == {}


async def test_m1_a_flood_of_strangers_manifests_hides_nothing_from_a_pinned_reader(
    dhts, monkeypatch
):
    """Review: a reader kept only the first MAX_RECORDS sealed records under a key, so a
    stranger's many pushed the coordinator's out, and an unpinned reader took 4096 copies of
    one forged manifest as the swarm's. A pinned read opens the signer's record alone; an
    unpinned one that hits the cap refuses to choose."""
    from node.swarm import dht as swarm_dht

    monkeypatch.setattr(swarm_dht, "MAX_RECORDS", 8)
    honest, stranger = dhts
    coordinator = Identity.generate()
    forged = manifest(7)
    for _ in range(10):  # sealed, each under a fresh key (a store says whichever peer answered)
        await SwarmDHT(stranger, SWARM, 5.0, Identity.generate()).put_manifest(forged, 60)
    ours = manifest(100)
    await SwarmDHT(honest, SWARM, 5.0, coordinator).put_manifest(ours, 60)  # (as above)
    reader = SwarmDHT(honest, SWARM, 5.0)
    assert await reader.get_manifest(signer=coordinator.node_id) == ours
    with pytest.raises(ManifestConflict, match="manifests in the DHT"):
        await reader.get_manifest()
