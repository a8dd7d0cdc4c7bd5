"""DHT record parsing (untrusted input) and the coordinator's assignment policy (#4 groundwork)."""

from __future__ import annotations

import logging
import math

import pytest

from coordinator.assignment import assign, capacities, rebalance
from node.swarm.records import NodeRecord, manifest_key, parse_stage_records, stage_key


def rec(peer: str, throughput: float = 1.0, state: str = "online", **over) -> dict:
    return {
        "peer_id": peer,
        "address": "203.0.113.7:7000",
        "state": state,
        "throughput": throughput,
        "load": 0,
        "version": "0.1.0",
        "config_hash": "0123456789abcdef",
        **over,
    }


def swarm_of(*stages: list[dict]) -> dict[int, dict[str, NodeRecord]]:
    return {
        k: {r["peer_id"]: NodeRecord.model_validate(r) for r in rs} for k, rs in enumerate(stages)
    }


def test_keys_are_namespaced_and_validated():
    assert stage_key("tiny-shakespeare", 2) == "tiny-shakespeare/stage/2"
    assert manifest_key("s1") == "s1/manifest"
    for bad in ("", "Has Space", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="swarm id"):
            stage_key(bad, 0)


def test_malformed_records_are_skipped_with_a_log_line(caplog):
    raw = {
        "good": rec("good"),
        "nan": rec("nan", throughput=float("nan")),
        "extra": {**rec("extra"), "admin": True},
        "addr": rec("addr", address="not an address"),
        "port": rec("port", address="1.2.3.4:99999"),
        "liar": rec("someone-else"),
        "junk": "not even a dict",
        "state": rec("state", state="boss"),
    }
    with caplog.at_level(logging.WARNING):
        parsed = parse_stage_records(raw, stage=1)
    assert list(parsed) == ["good"]
    assert len([r for r in caplog.records if "skipped" in r.message]) == 7
    assert parse_stage_records(["a list"], stage=1) == {}
    assert parse_stage_records(None, stage=1) == {}


def test_a_joiner_goes_to_an_empty_stage_first_then_to_the_slowest():
    assert assign(swarm_of([rec("a")], [], [rec("b")]), 3) == 1
    assert assign(swarm_of([rec("a", 5)], [rec("b", 1)], [rec("c", 3)]), 3) == 1
    # a stage whose only node is draining counts as empty
    assert assign(swarm_of([rec("a")], [rec("b", state="draining")]), 2) == 1
    # joining nodes add no capacity yet, but do fill a stage
    assert assign(swarm_of([rec("a", 1)], [rec("b", 9, state="joining")]), 2) == 1


def test_rebalance_moves_a_node_only_when_it_helps_enough():
    balanced = swarm_of([rec("a", 2), rec("b", 2)], [rec("c", 3)])
    assert rebalance(balanced, 2) is None  # 4 vs 3: within the hysteresis band

    lopsided = swarm_of([rec("a", 2), rec("b", 2), rec("c", 2)], [rec("d", 1)])
    move = rebalance(lopsided, 2)
    assert move is not None and (move.from_stage, move.to_stage) == (0, 1)
    assert move.bottleneck_after > move.bottleneck_before
    caps = capacities(lopsided, 2)
    assert caps == [6.0, 1.0]

    single = swarm_of([rec("a", 10)], [rec("b", 1)])
    assert rebalance(single, 2) is None  # never empty a stage

    no_gain = swarm_of([rec("a", 9), rec("b", 0.1)], [rec("c", 1)])
    assert rebalance(no_gain, 2) is None  # moving b barely changes the bottleneck


# ---- routing, rounds and the manifest (pure functions every replica computes alike) ----------
def test_stage0_split_is_exact_proportional_and_the_same_for_every_member():
    from node.swarm.routing import split_share

    members = [("b", 1.0), ("a", 3.0)]
    share = split_share(members, 8)
    assert share == split_share(list(reversed(members)), 8)  # order-free: all agree
    assert sorted(i for ids in share.values() for i in ids) == list(range(8))  # each id once
    assert (len(share["a"]), len(share["b"])) == (6, 2)  # by throughput
    assert split_share([("a", 1.0), ("b", 1.0), ("c", 1.0)], 2)["c"] == []
    assert split_share([], 4) == {}
    # overlapped (#11): what a member began early stays its own, counted in its quota; each id
    # once whatever the claims (overlapping, out of range, a non-member's)
    begun = split_share([("a", 1.0), ("b", 1.0)], 4, {"a": [0]})
    assert begun == {"a": [0, 1], "b": [2, 3]}
    odd = split_share([("a", 1.0), ("b", 1.0)], 4, {"a": [0, 9], "b": [0, 1], "z": [2]})
    assert sorted(i for ids in odd.values() for i in ids) == list(range(4)) and 0 in odd["a"]
    most = split_share([("a", 1.0), ("b", 1.0)], 4, {"a": [0, 1, 2]})
    assert most == {"a": [0, 1, 2], "b": [3]}


def test_routing_prefers_less_loaded_faster_replicas_and_feeds_new_ones():
    from node.swarm.routing import pick_replica

    assert pick_replica({}, {}) is None
    assert pick_replica({"a": 2, "b": 0}, {"a": 1.0, "b": 1.0}) == "b"
    assert pick_replica({"a": 1, "b": 1}, {"a": 3.0, "b": 1.0}) == "a"  # 3x faster
    # an unmeasured (just joined) replica counts as average: it gets work, not starvation
    assert pick_replica({"fast": 1, "new": 0}, {"fast": 200.0}) == "new"


def test_a_round_is_valid_only_if_it_covers_the_step_exactly_once():
    from node.protocol.stepend import check_round

    def m(node, ids, step=3, synced=True):
        return {"node": node, "ids": ids, "step": step, "synced": synced}

    def info(*ms):
        return [{**x, "throughput": 1.0, "leaving": False} for x in ms]

    assert check_round(info(m("a", [0, 2]), m("b", [1, 3])), 3, 4) == "ok"
    assert check_round(info(m("a", [0, 1, 2, 3]), m("j", [], synced=False)), 3, 4) == "ok"
    assert "twice" in check_round(info(m("a", [0, 1, 2]), m("b", [2, 3])), 3, 4)
    assert "not counted" in check_round(info(m("a", [0, 1]), m("b", [3])), 3, 4)
    assert check_round(info(m("a", [0, 1, 2, 3]), m("b", [], step=5)), 3, 4) == "behind"
    assert "steps" in check_round(info(m("a", [0, 1, 2, 3]), m("b", [], step=2)), 3, 4)
    boot = info(m("a", [], step=0, synced=False), m("b", [], step=0, synced=False))
    assert check_round(boot, 0, 4) == "bootstrap"
    assert "malformed" in check_round([{"node": "x"}], 3, 4)  # a peer's gather is untrusted
    # overlapped: the next step's ids stage-0 replicas began (#11) are below the overlap,
    # disjoint, and no leaving member's (the next split leaves them theirs)
    a, b = m("a", [0, 2]), m("b", [1, 3])
    assert check_round(info({**a, "begun": [0]}, {**b, "begun": [1]}), 3, 4, 2) == "ok"
    assert "early ids" in check_round(info({**a, "begun": [0]}, {**b, "begun": [0]}), 3, 4, 2)
    assert "early ids" in check_round(info({**a, "begun": [3]}, b), 3, 4, 2)
    assert "early ids" in check_round(info({**a, "begun": [0]}, b), 3, 4)  # 1f1b: none
    assert "early ids" in check_round(info({**a, "begun": ["0"]}, b), 3, 4, 2)
    assert "malformed" in check_round(info({**a, "begun": 5}, b), 3, 4, 2)
    leaving = [
        {**x, "leaving": True} if x["node"] == "a" else x for x in info({**a, "begun": [0]}, b)
    ]
    assert "leaving member" in check_round(leaving, 3, 4, 2)


def test_a_mismatched_manifest_is_refused_naming_every_difference():
    from node.config import TrainConfig
    from node.swarm.manifest import ManifestMismatch, check_manifest, manifest_for

    class Cfg(TrainConfig):
        wire_codec: str = "bf16"

    ours = manifest_for(Cfg(), "c0ffee", "s1")
    assert check_manifest(ours, ours) is None
    other = manifest_for(Cfg(model={"d_model": 128}, seed=3), "c0ffee", "s1")
    with pytest.raises(ManifestMismatch) as err:
        check_manifest(ours, other)
    text = str(err.value)
    assert "model.d_model: swarm 256, yours 128" in text and "seed: swarm 0, yours 3" in text
    newer = ours.model_copy(update={"version": "9.9.0"})
    with pytest.raises(ManifestMismatch, match=r"install resbm 9\.9\.0"):
        check_manifest(newer, ours)
    # the overlapped rule is part of it: another prediction computes other gradients
    rule = {"schedule": "overlapped", "overlap": 2, "microbatches": 4}
    swarm = manifest_for(Cfg(**rule), "c0ffee", "s1")
    half = manifest_for(Cfg(**rule, predict_scale=0.5), "c0ffee", "s1")
    with pytest.raises(ManifestMismatch, match=r"predict_scale: swarm '\(unset\)', yours 0\.5 \("):
        check_manifest(swarm, half)
    # the whole update (the default) leaves the manifest as it was before the setting, so a
    # swarm of that code and this one's nodes still agree; a scale prediction does not use
    # (--no-predict-weights) is no difference either
    assert "predict_scale" not in swarm.settings and "predict_weights" in swarm.settings
    none = manifest_for(Cfg(**rule, predict_scale=0.0), "c0ffee", "s1")  # on, but a = 0
    assert none.settings["predict_scale"] == 0.0 and none.fingerprint != swarm.fingerprint
    off = {**rule, "predict_weights": False}
    assert manifest_for(Cfg(**off, predict_scale=0.5), "c0ffee", "s1") == manifest_for(
        Cfg(**off), "c0ffee", "s1"
    )


def test_a_peer_claiming_absurd_throughput_neither_crashes_the_split_nor_takes_it():
    """#10 C1: throughput is gathered from every round member, so it is a peer's claim."""
    from node.swarm.routing import MAX_RATIO, split_share

    share = split_share([("a", 1e308), ("b", 1e308)], 4)  # their sum overflowed to inf
    assert sorted(len(ids) for ids in share.values()) == [2, 2]
    share = split_share([("honest", 2.0), ("evil", 1e300), ("slow", 1.0)], 100)
    assert sorted(i for ids in share.values() for i in ids) == list(range(100))
    # weights 2, 1 and (capped) MAX_RATIO x the slowest's: its quota, rounded up at most
    assert len(share["evil"]) <= math.ceil(100 * MAX_RATIO / (MAX_RATIO + 3)) and share["slow"]
    assert len(share["honest"]) >= 2 * len(share["slow"]) - 1  # honest claims still count
