"""DHT record parsing (untrusted input) and the coordinator's assignment policy (#4 groundwork)."""

from __future__ import annotations

import logging

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
