"""#10 H5 and capability 5 in the protocol core: what a peer can make a node hold is bounded.
Replays (recovery's re-sends) open at most MAX_ADOPTIONS adoptions; early messages and
adoptions share a byte budget (limits.max_held_mb, never below an honest recovery's burst); the
per-peer tables a stranger's fresh keys add to are pruned past MAX_PEERS."""

from __future__ import annotations

import torch

import node.protocol.state as state_mod
from node.data import MicrobatchId
from node.protocol import events as ev
from node.protocol.adoption import MAX_ADOPTIONS, MAX_UNLISTED, MAX_UNLISTED_PER_PEER
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
    s.saw_replicas(f"ghost-{i}" for i in range(MAX_ADOPTIONS + 10))  # as if the DHT listed them
    for i in range(MAX_ADOPTIONS + 10):
        machine.handle([replay(machine, 0, i % machine.core.M, f"ghost-{i}")], 0.0)
    assert len(s.adoptions) == MAX_ADOPTIONS
    assert s.errors["bad_replay"] == 10
    assert s.held_bytes() == s.recount_held()


def test_one_neighbours_word_opens_few_adoptions_for_ids_no_view_listed():
    """A replay may name an id no View listed yet (a joiner that died before our view caught
    up must still be adopted: gating on the view stalled a review's runs), but one neighbour's
    word alone opens at most MAX_UNLISTED_PER_PEER of them: a hostile neighbour's fresh ids
    filled every one of the MAX_ADOPTIONS, and an honest neighbour's replays were refused."""
    machine = _replica()
    s = machine.state
    for i in range(3 * MAX_UNLISTED_PER_PEER):
        machine.handle([replay(machine, 0, i % machine.core.M, f"ghost-{i}")], 0.0)
    assert len(s.adoptions) == MAX_UNLISTED_PER_PEER
    assert s.errors["bad_replay"] == 2 * MAX_UNLISTED_PER_PEER
    # an id the view listed is still adopted on that neighbour's replay
    s.saw_replicas(["s1r9"])
    machine.handle([replay(machine, 0, 0, "s1r9")], 0.0)
    assert ("s1r9", 0) in s.adoptions


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


def test_many_neighbours_together_open_few_adoptions_for_ids_no_view_listed():
    """A review: keys are free, and 16 neighbours x MAX_UNLISTED_PER_PEER filled all
    MAX_ADOPTIONS again. Unlisted ids open at most MAX_UNLISTED in all; listed ones still open."""
    machine = _replica()
    s = machine.state
    for n in range(MAX_ADOPTIONS // MAX_UNLISTED_PER_PEER):
        for i in range(MAX_UNLISTED_PER_PEER):
            mb = machine.core.batches.microbatch(0, i % machine.core.M)
            fwd = Forward(mb.id, torch.zeros(64), mb.offsets, mb.fingerprint, f"ghost-{n}-{i}")
            machine.handle([ev.Received(f"sybil-{n}", "up", fwd)], 0.0)
    assert len(s.adoptions) == MAX_UNLISTED
    s.saw_replicas(["s1r9"])
    machine.handle([replay(machine, 0, 0, "s1r9")], 0.0)
    assert ("s1r9", 0) in s.adoptions


def test_only_a_replica_a_view_dropped_lately_holds_the_step_when_named_dead():
    """#10 M2 (a review): a neighbour's word that a replica died held our step for
    adopt_wait_s. Now only if our View listed it lately and lists it no more (a death its
    neighbours saw as we did); not one it still lists (in any state: a joiner too), nor one
    long gone, nor one never listed."""
    from node.protocol.adoption import LATELY_TTLS

    machine = _replica()
    s, c = machine.state, machine.core
    now = 100.0
    ttl = c.cfg.record_ttl_s
    s.seen_replicas.update({"gone-lately": now - ttl, "gone-long": now - 3 * LATELY_TTLS * ttl})
    for i, dead in enumerate(("gone-lately", "gone-long", "s1r1", "never")):
        machine.handle([replay(machine, 0, i % c.M, dead)], now)
    held = {d: a.confirmed for (d, _), a in s.adoptions.items()}
    assert held == {"gone-lately": True, "gone-long": False, "s1r1": False, "never": False}
    assert "s1r1" not in s.dead and "gone-lately" in s.dead  # a listed one is not dead to us
