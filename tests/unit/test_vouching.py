"""#10 C2, the pure part: whom a joiner asks for its stage's state and whether it takes what came
(node/protocol/vouching.py), and the digest replicas vouch with (checkpoint.state_digest)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from pydantic import ValidationError

from node import checkpoint
from node.protocol.vouching import MAX_NODES, MAX_PER_NODE, OK, WAIT, Vouches, snapshot_digest
from node.swarm.records import MAX_VOUCHES, NodeRecord, NodeState, Vouch
from node.version import VERSION

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def record(node: str, vouches: list[tuple[int, str]], averager: str | None = "Qm1") -> NodeRecord:
    return NodeRecord(
        peer_id=node, address="127.0.0.1:1", state=NodeState.online, throughput=1.0, load=0,
        version=VERSION, config_hash="0" * 16, step=max((s for s, _ in vouches), default=0),
        averager=averager, vouches=[Vouch(step=s, digest=d) for s, d in vouches],
    )  # fmt: skip


def seen(records: dict[str, list[tuple[int, str]]], me: str = "me") -> Vouches:
    v = Vouches(me)
    v.add({n: record(n, x) for n, x in records.items()})
    return v


def test_two_vouches_are_needed_where_two_replicas_vouch():
    v = seen({"a": [(5, H1)], "b": [(5, H1)], "c": [(5, H2)]})
    assert v.need() == 2
    assert v.verdict(5, H1) == OK
    assert v.verdict(5, H2) == "replicas vouch for another state at step 5"
    assert v.verdict(5, H3) == "replicas vouch for another state at step 5"
    assert v.verdict(6, H1) == WAIT  # nobody vouches for step 6 yet: records lag


def test_one_replicas_word_is_all_a_stage_of_one_has():
    v = seen({"a": [(5, H1)]})
    assert v.need() == 1
    assert v.verdict(5, H1) == OK
    assert v.verdict(5, H2) == "replicas vouch for another state at step 5"
    assert seen({}).need() == 0 and seen({}).verdict(5, H1) == WAIT


def test_a_joiners_own_record_and_records_without_an_averager_do_not_count():
    v = Vouches("me")
    v.add({"me": record("me", [(5, H2)]), "a": record("a", [(5, H1)])})
    v.add({"b": record("b", [(5, H2)], averager=None)})
    assert v.vouchers() == {"a"}
    assert v.verdict(5, H2) == "replicas vouch for another state at step 5"


def test_two_disagreeing_replicas_make_a_joiner_wait_not_take_either():
    v = seen({"a": [(5, H1)], "h": [(5, H2)]})
    assert v.verdict(5, H1) == WAIT and v.verdict(5, H2) == WAIT


def test_vouches_collected_over_time_cover_a_download_that_spans_steps():
    v = Vouches("me")
    v.add({"a": record("a", [(5, H1)]), "b": record("b", [(4, H3)])})
    v.add({"a": record("a", [(6, H2)]), "b": record("b", [(5, H1), (6, H2)])})
    assert v.verdict(5, H1) == OK and v.verdict(6, H2) == OK


def test_the_state_most_replicas_vouch_for_is_asked_for_first():
    v = seen({"a": [(5, H1)], "b": [(5, H1)], "h": [(9, H2)], "c": [(4, H3), (5, H1)]})
    for seed in range(20):
        order = [d.node for d in v.donors(random.Random(seed))]
        assert sorted(order[:3]) == ["a", "b", "c"] and order[3] == "h"
    firsts = {v.donors(random.Random(seed))[0].node for seed in range(40)}
    assert firsts == {"a", "b", "c"}  # random among equals: no replica serves every joiner


def test_a_strangers_records_cannot_grow_what_a_joiner_keeps():
    v = Vouches("me")
    for i in range(MAX_NODES + 10):
        v.add({f"n{i}": record(f"n{i}", [(s, H1) for s in range(MAX_VOUCHES)])})
    assert len(v.averagers) == MAX_NODES and len(v.seen) == MAX_NODES * MAX_VOUCHES
    # one key announcing fresh steps at every refresh keeps only its newest
    for t in range(0, 10 * MAX_PER_NODE, MAX_VOUCHES):
        v.add({"n0": record("n0", [(t + s, H2) for s in range(MAX_VOUCHES)])})
    kept = sorted(s for n, s in v.seen if n == "n0")
    assert len(kept) == MAX_PER_NODE and kept[-1] == 10 * MAX_PER_NODE - 1


def test_a_record_vouches_for_a_bounded_number_of_well_formed_digests():
    with pytest.raises(ValidationError):
        record("a", [(s, H1) for s in range(MAX_VOUCHES + 1)])
    with pytest.raises(ValidationError):
        record("a", [(1, "not-a-digest")])
    with pytest.raises(ValidationError):
        record("a", [(1, H1)], averager="0OIl")  # not base58


def _state(step: int = 3):
    tensors = {"param.w": torch.randn(64), "optim.0.0.exp_avg": torch.randn(8, 8)}
    meta = {
        "stage": "1",
        "step": str(step),
        "model": "{}",
        "optim": json.dumps(
            [{"scalars": {"0.step": 3}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}]
        ),
    }
    return tensors, meta


def test_the_digest_covers_every_bit_the_joiner_takes_and_nothing_it_keeps():
    tensors, meta = _state()
    d = checkpoint.state_digest(tensors, meta)
    copy = {n: t.clone() for n, t in tensors.items()}
    assert checkpoint.state_digest(copy, dict(meta)) == d
    flipped = {n: t.clone() for n, t in tensors.items()}
    flipped["param.w"].view(torch.int32)[7] ^= 1  # one bit of one weight
    assert checkpoint.state_digest(flipped, meta) != d
    assert checkpoint.state_digest(tensors, {**meta, "step": "4"}) != d
    scalars = json.dumps(
        [{"scalars": {"0.step": 4}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}]
    )
    assert checkpoint.state_digest(tensors, {**meta, "optim": scalars}) != d
    # which parameter each optimizer tensor belongs to (a donor swapped them: review)
    swapped = json.dumps(
        [{"scalars": {"0.step": 3}, "param_groups": [{"lr": 0.1, "params": [1, 0]}]}]
    )
    assert checkpoint.state_digest(tensors, {**meta, "optim": swapped}) != d
    renamed = {"param.v" if n == "param.w" else n: t for n, t in tensors.items()}
    assert checkpoint.state_digest(renamed, meta) != d
    reshaped = {**tensors, "param.w": tensors["param.w"].view(8, 8)}
    assert checkpoint.state_digest(reshaped, meta) != d
    # the optimizer's settings stay the joiner's own (load_stage_state): not digested
    settings = json.dumps(
        [{"scalars": {"0.step": 3}, "param_groups": [{"lr": 9.0, "params": [0, 1]}]}]
    )
    assert checkpoint.state_digest(tensors, {**meta, "optim": settings}) == d


def test_a_snapshot_is_digested_as_served_and_a_malformed_one_refused():
    tensors, meta = _state()
    names = sorted(tensors)
    served = {"step": 3, "names": names, "meta": meta, "group0": None}
    listed = [tensors[n] for n in names]
    assert snapshot_digest(served, listed) == (3, checkpoint.state_digest(tensors, meta))
    bad = [
        ({**served, "step": 4}, listed),  # the outer step is not the state's
        ({**served, "names": names[:1]}, listed),
        ({**served, "names": [names[0], names[0]]}, listed),
        (served, [listed[0], "not a tensor"]),
        ({**served, "meta": {**meta, "optim": "[{}]"}}, listed),
        ({k: v for k, v in served.items() if k != "meta"}, listed),
        ("not a dict", listed),
        ({**served, "group0": [["n-a"], ["n-b", 1.0]]}, listed),
        ({**served, "group0": [["n-a", "fast"], ["n-b", 1.0]]}, listed),
    ]
    for meta_bad, tensors_bad in bad:
        with pytest.raises(ValueError):
            snapshot_digest(meta_bad, tensors_bad)


def test_stage_0s_split_is_covered_by_the_digest():
    """#10 C2: a joiner of stage 0 takes the step's split (`group0`: who dispatches which
    microbatches) with the state; a donor could serve vouched tensors with a split of its own
    (the joiner then dispatched others' microbatches, or none). Now the digest covers it, in
    any order it is served."""
    tensors, meta = _state()
    names = sorted(tensors)
    listed = [tensors[n] for n in names]
    split = [["n-a", 1.5], ["n-b", 2.0]]
    served = {"step": 3, "names": names, "meta": meta, "group0": split}
    step, digest = snapshot_digest(served, listed)
    assert step == 3
    assert digest == checkpoint.state_digest(tensors, meta, [("n-b", 2.0), ("n-a", 1.5)])
    assert digest != checkpoint.state_digest(tensors, meta)  # without a split
    for forged in ([["n-a", 1.5], ["n-b", 9.0]], [["n-a", 1.5]], [*split, ["n-c", 1.0]]):
        assert snapshot_digest({**served, "group0": forged}, listed)[1] != digest
    # a split of one is left out: replicas hold different ones of their own (at start,
    # resumed, applying alone), and would never vouch for one digest
    alone = checkpoint.state_digest(tensors, meta)
    assert checkpoint.state_digest(tensors, meta, [("n-a", 1.0)]) == alone


def test_a_state_that_hands_one_parameters_optimizer_state_to_another_is_refused():
    """Review of #10 C2: torch takes the donor's parameter ids as they come, so a donor could
    serve the vouched tensors with the ids permuted (same digest, before the ids were in it):
    one parameter's momentum then drove another's update. Refused at load too, and what is
    loaded must have the digest replicas vouched for."""
    from node.protocol import scenarios
    from node.protocol.vouching import snapshot_digest

    swarm, faults = scenarios.build(3, ())
    assert scenarios.run(swarm, faults, 3).ok
    meta, tensors = swarm.members["s1r0"].machine.snapshot()
    step, digest = snapshot_digest(meta, tensors)
    optim = json.loads(meta["meta"]["optim"])
    assert any(len(g["params"]) > 1 for m in optim for g in m["param_groups"])
    for m in optim:
        for g in m["param_groups"]:
            g["params"] = g["params"][::-1]
    permuted = {**meta, "meta": {**meta["meta"], "optim": json.dumps(optim)}}
    assert snapshot_digest(permuted, tensors)[1] != digest  # the vouches do not cover it
    joiner = swarm._spawn("s1r9", 1, synced=False).machine
    took, _ = joiner.load_state({**permuted, "vouched": digest}, tensors, swarm.now)
    assert not took and joiner.state.errors["bad_state"] == 1
    # a state whose digest, once loaded, is not the vouched one: refused
    took, _ = joiner.load_state({**meta, "vouched": H1}, tensors, swarm.now)
    assert not took and joiner.state.errors["bad_state"] == 2
    # the honest state, vouched for, is taken, and holds those bits
    took, _ = joiner.load_state({**meta, "vouched": digest}, tensors, swarm.now)
    assert took and joiner.sync.digest(step) == digest
