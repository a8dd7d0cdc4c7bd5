"""#10 H5 and capability 5 in the protocol core: what a peer can make a node hold is bounded.
Replays (recovery's re-sends) open at most MAX_ADOPTIONS adoptions; early messages and
adoptions share a byte budget (limits.max_held_mb, never below an honest recovery's burst); the
per-peer tables a stranger's fresh keys add to are pruned past MAX_PEERS."""

from __future__ import annotations

import torch

import node.protocol.state as state_mod
from node.data import MicrobatchId
from node.protocol import events as ev
from node.protocol.adoption import MAX_ADOPTIONS
from node.protocol.harness import Swarm
from node.protocol.state import LinkInfo, StageState
from node.wire.messages import Backward, Forward


def _replica(stages: int = 2):
    swarm = Swarm(seed=0, stages=stages, replicas=2)
    machine = swarm.members["s1r0"].machine
    assert machine.state.synced and machine.state.step == 0
    return machine


def replay(machine, step: int, index: int, dead: str, numel: int = 64) -> ev.Received:
    mb = machine.core.batches.microbatch(step, index)
    z = torch.zeros(numel)  # the core never looks at its shape (the transport checked it)
    return ev.Received("s0r0", "up", Forward(mb.id, z, mb.offsets, mb.fingerprint, dead))


def claim(step: int, index: int, dead: str, numel: int) -> ev.Received:
    grad = torch.zeros(numel)
    return ev.Received("s2r0", "down", Backward(MicrobatchId(step, index), grad, dead))


def small_budget(machine) -> int:
    core = machine.core
    limits = core.cfg.limits.model_copy(update={"max_held_mb": 0.001})
    core.cfg = core.cfg.model_copy(update={"limits": limits})
    return core.held_budget  # never below an honest recovery's burst


def test_replays_of_fresh_ids_open_at_most_max_adoptions():
    """A stranger naming fresh ids held an adoption (and its tensors) for each: now at most
    MAX_ADOPTIONS are open (the dead ids they add are pruned with the other tables)."""
    machine = _replica()
    s = machine.state
    for i in range(MAX_ADOPTIONS + 10):
        machine.handle([replay(machine, 0, i % machine.core.M, f"ghost-{i}")], 0.0)
    assert len(s.adoptions) == MAX_ADOPTIONS
    assert s.errors["bad_replay"] == 10


def test_early_messages_and_adoptions_share_a_byte_budget():
    machine = _replica()
    s = machine.state
    budget = small_budget(machine)
    assert budget > 1000
    numel = (budget // 2 - 2048) // 4  # two fit, a third does not
    machine.handle([replay(machine, 1, 0, "", numel=numel)], 0.0)  # of the next step
    assert len(s.early) == 1
    machine.handle([replay(machine, 1, 1, "", numel=numel)], 0.0)  # fits
    machine.handle([replay(machine, 1, 2, "", numel=numel)], 0.0)  # does not
    assert len(s.early) == 2 and s.held_bytes() <= budget
    # an adoption needs room too: with the early buffer near the budget, its tensor is refused
    machine.handle([replay(machine, 0, 0, "s1r1", numel=numel)], 0.0)
    assert not any(a.forwards for a in s.adoptions.values()) and s.errors["held_budget"] == 1
    assert s.held_bytes() <= budget


def test_replayed_gradients_count_against_the_byte_budget_too():
    """A review: only replayed forwards were checked, so a downstream neighbour filled an
    adoption with gradients, many times the budget."""
    machine = _replica(stages=3)
    s = machine.state
    budget = small_budget(machine)
    numel = budget // 4 // 3 - 512  # three fit
    for i in range(machine.core.M):
        machine.handle([claim(0, i, "s1r1", numel)], 0.0)
    assert sum(len(a.claims) for a in s.adoptions.values()) == 3
    assert s.errors["held_budget"] == machine.core.M - 3 and s.held_bytes() <= budget


def test_per_peer_tables_are_pruned_past_the_bound_keeping_what_open_work_needs(monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_PEERS", 8)
    s = StageState("me", False, 2)
    for i in range(20):  # a stranger's fresh keys: each linked, dropped, declared dead
        s.links[f"k{i}"] = LinkInfo("up", i, up=i >= 18)
        s.mark_dead(f"k{i}", float(i))
        s.flaps[f"k{i}"] = float(i)
    s.saw_replicas([f"r{i}" for i in range(20)])
    s.suspects["k0"] = ("up", "lost", 0.0, None)  # still being judged: kept
    s.prune_peers()
    assert len(s.links) <= 8 + 1 and "k0" in s.links and s.has_live("k19")
    assert len(s.dead) <= 8 + 1 and "k0" in s.dead and "k19" in s.dead and "k1" not in s.dead
    assert set(s.dead_at) == s.dead and set(s.lost_at) == s.dead
    assert len(s.flaps) == 8 and "k19" in s.flaps
    assert list(s.seen_replicas) == [f"r{i}" for i in range(12, 20)]  # the newest listed
