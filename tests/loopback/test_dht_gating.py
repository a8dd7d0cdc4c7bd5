"""Token-gated DHT records with real hivemind DHT peers on loopback: two holders of the swarm's
token, a stranger with none and a node of another swarm (another token), all in one DHT.

A holder's record reaches the other holder; a stranger's or other-swarm node's record never
reaches a holder, even under the same key with a later expiration (poisoning), and the
averager's own DHT keys (matchmaking, state sharing) still work through the gate.
The DHT peers fork: they are created before any torch compute or gRPC object of this module."""

from __future__ import annotations

import threading

import pytest

from node.swarm.dht import SwarmDHT, dht_now, start_dht, visible_maddrs
from node.swarm.gating import TokenRecordValidator
from node.swarm.records import NodeRecord
from node.version import VERSION
from tests.helpers import in_spawned_process, key, nid

TOKEN = "the-swarm-token-0123456789"
OTHER = "another-swarm-token-9876543"
TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def peers():
    a = start_dht([], token=TOKEN)
    maddrs = visible_maddrs(a)
    b = start_dht(maddrs, token=TOKEN)
    stranger = start_dht(maddrs)
    other = start_dht(maddrs, token=OTHER)
    yield {"a": a, "b": b, "stranger": stranger, "other": other}
    for dht in (other, stranger, b, a):
        dht.shutdown()


def store(dht, key, value, ttl_s=60.0, subkey=None) -> bool:
    """hivemind reports the last replica's answer: a holder's store may read False when that
    replica was the other swarm's node (which refuses it), so tests check what holders read."""
    future = dht.store(key, value, dht_now() + ttl_s, subkey=subkey, return_future=True)
    return future.result(timeout=TIMEOUT_S)


def get(dht, key):
    found = dht.get(key, latest=True, return_future=True).result(timeout=TIMEOUT_S)
    return None if found is None else found.value


def test_holders_read_each_others_records(peers):
    store(peers["a"], "gating.shared", {"x": 1})
    assert get(peers["b"], "gating.shared") == {"x": 1}


@pytest.mark.parametrize("intruder", ["stranger", "other"])
def test_foreign_records_are_invisible_to_holders(peers, intruder):
    key = f"gating.foreign.{intruder}"
    store(peers[intruder], key, "planted")
    assert get(peers["a"], key) is None
    assert get(peers["b"], key) is None


@pytest.mark.parametrize("intruder", ["stranger", "other"])
def test_a_holders_record_cannot_be_overwritten(peers, intruder):
    key = f"gating.poison.{intruder}"
    store(peers["a"], key, "genuine", ttl_s=60)
    store(peers[intruder], key, "poison", ttl_s=600)  # later expiry: would win if accepted
    assert get(peers["b"], key) == "genuine"
    assert get(peers["a"], key) == "genuine"


def test_holders_records_are_invisible_to_another_swarm(peers):
    store(peers["a"], "gating.private", "ours")
    assert get(peers["other"], "gating.private") is None


def test_subkeyed_records_keep_only_the_holders(peers):
    """The stage map's shape: one record per node under one key."""
    key = "gating.stage"
    store(peers["a"], key, "holder", subkey="node-a")
    store(peers["stranger"], key, "planted", subkey="node-s")
    store(peers["other"], key, "planted", subkey="node-o")
    found = get(peers["b"], key)
    assert {sk: v.value for sk, v in found.items()} == {"node-a": "holder"}


async def test_swarm_dht_announce_through_the_gate(peers):
    record = NodeRecord(
        peer_id=nid("n0"),
        address="127.0.0.1:7000",
        state="online",
        throughput=1.0,
        load=0,
        version=VERSION,
        config_hash="0123456789abcdef",
        step=0,
    )
    await SwarmDHT(peers["a"], "gated", TIMEOUT_S, identity=key("n0")).announce(0, record, 60.0)
    stranger = record.model_copy(update={"peer_id": nid("evil"), "address": "10.0.0.66:7000"})
    await SwarmDHT(peers["stranger"], "gated", TIMEOUT_S, key("evil")).announce(0, stranger, 600)
    members = await SwarmDHT(peers["b"], "gated", TIMEOUT_S).stage_members(0)
    assert list(members) == [nid("n0")]


def test_tampered_or_replayed_values_fail_validation():
    from hivemind.dht.validation import DHTRecord

    v = TokenRecordValidator(TOKEN)
    rec = DHTRecord(b"key", b"sub", b"value", 100.0)
    signed = DHTRecord(rec.key, rec.subkey, v.sign_value(rec), rec.expiration_time)
    assert v.validate(signed) and v.strip_value(signed) == b"value"
    assert not TokenRecordValidator(OTHER).validate(signed)
    assert not v.validate(DHTRecord(b"other", b"sub", signed.value, 100.0))  # another key
    assert not v.validate(DHTRecord(b"key", b"sub", signed.value, 1000.0))  # later expiry
    flipped = signed.value[:2] + bytes([signed.value[2] ^ 1]) + signed.value[3:]
    assert not v.validate(DHTRecord(b"key", b"sub", flipped, 100.0))
    assert not v.validate(rec)  # unsigned
    assert not v.validate(DHTRecord(b"key", b"sub", b"", 100.0))
    with pytest.raises(ValueError):
        TokenRecordValidator("")


def _averaging_through_the_gate(conn) -> None:
    """In a fresh (spawned) process, as in a node: the gated DHTs and averagers fork first."""
    import multiprocessing

    import torch

    multiprocessing.set_start_method("fork", force=True)  # hivemind's processes fork, as in a node

    from common.identity import Identity
    from node.swarm.averaging import StageAverager

    keys = [Identity.generate() for _ in range(2)]
    a = start_dht([], token=TOKEN, identity=keys[0])
    b = start_dht(visible_maddrs(a), token=TOKEN, identity=keys[1])
    numel = 10
    avgs = [
        StageAverager(d, "gating_avg", numel, target_group_size=2, matchmaking_s=1.0, identity=k)
        for d, k in zip((a, b), keys, strict=True)
    ]
    try:
        grads = [torch.full((numel,), 1.0), torch.full((numel,), 2.0)]
        results: list = [None, None]

        def go(i: int) -> None:
            for _ in range(3):  # a group may miss on a busy 2-core machine: retry a little
                results[i] = avgs[i].round(grads[i], float(i), {"step": 0}, timeout_s=20.0)
                if results[i] is not None:
                    return

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        totals = [None if r is None else sum(r.vectors)[:numel].tolist() for r in results]
        avgs[0].set_state_provider(lambda: ({"step": 7}, [torch.arange(4.0)]))
        avgs[0].share_state(True)
        got = avgs[1].load_state_from(avgs[0].address, timeout_s=20.0, max_bytes=1 << 20)
        state = got if isinstance(got, str) else (got[0]["step"], got[1][0].tolist())
        conn.send({"totals": totals, "state": state})
    finally:
        for avg in avgs:
            avg.shutdown()
        b.shutdown()
        a.shutdown()


@pytest.mark.timeout(240)
def test_averager_rounds_and_state_sharing_work_when_gated():
    """hivemind's averager keeps its matchmaking and state-sharing records in the same DHT:
    they are signed and checked too, and must still work between token holders. (In a spawned
    process: the averager forks, and this test process has long had gRPC and torch threads.)"""
    got = in_spawned_process(_averaging_through_the_gate, 200)
    assert all(t is not None for t in got["totals"]), "no averaging round through the gated DHT"
    for total in got["totals"]:
        assert total == [3.0] * 10
    assert got["state"] == (7, [0.0, 1.0, 2.0, 3.0]), "state download through the gated DHT failed"
