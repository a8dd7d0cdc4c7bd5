"""#10 H1, the rest: one stranger's own sealed record, claiming a far step for its stage, no longer
makes a node resync (again and again: the download it asks for is never vouched for) nor take a
neighbour's far-step data. A stage is ahead only where its replicas' records agree: two vouch for
one state there, or the only other replica does (SwarmView.agreed_step)."""

from __future__ import annotations

from node.protocol import events as ev
from node.protocol.harness import Swarm
from node.protocol.view import SwarmView
from node.swarm.records import NodeRecord, NodeState, Vouch
from node.version import VERSION

A, B = "a" * 64, "b" * 64


def rec(node: str, step: int, vouches: list[tuple[int, str]], state=NodeState.online):
    return NodeRecord(
        peer_id=node, address="127.0.0.1:1", state=state, throughput=1.0, load=0,
        version=VERSION, config_hash="0" * 16, step=step,
        vouches=[Vouch(step=s, digest=d) for s, d in vouches],
    )  # fmt: skip


def view(stage1: dict[str, NodeRecord], stage0: dict[str, NodeRecord] | None = None):
    return SwarmView(1, 2, True, {0: stage0 or {}, 1: stage1})


def test_one_strangers_far_claim_is_not_its_stages_word_where_others_vouch():
    x = rec("x", 10**5, [(10**5, B)])
    v = view({"h1": rec("h1", 3, [(2, A), (3, A)]), "h2": rec("h2", 3, [(3, A)]), "x": x})
    assert v.agreed_step(1, "me", set()) == 3
    # one honest replica and the stranger: two words, no agreement (neither moves us)
    assert view({"h1": rec("h1", 3, [(3, A)]), "x": x}).agreed_step(1, "me", set()) is None
    two = view({"h1": rec("h1", 9, [(9, A)]), "h2": rec("h2", 9, [(8, B), (9, A)])})
    assert two.agreed_step(1, "me", set()) == 9
    split = view({"h1": rec("h1", 9, [(9, A)]), "h2": rec("h2", 9, [(9, B)])})
    assert split.agreed_step(1, "me", set()) is None  # two replicas that disagree: no word


def test_a_lone_replicas_record_is_its_stages_word_and_the_dead_and_we_do_not_count():
    alone = view({"h": rec("h", 7, [(6, A), (7, B)]), "me": rec("me", 99, [(99, A)])})
    assert alone.agreed_step(1, "me", set()) == 7
    assert alone.agreed_step(1, "me", {"h"}) is None
    assert view({}).agreed_step(1, "me", set()) is None


def _replica():
    """Stage 1's first replica of a harness swarm (S=2, R=2), at step 0, synced."""
    swarm = Swarm(seed=0, stages=2, replicas=2)
    m = swarm.members["s1r0"]
    assert m.machine.state.synced and m.machine.state.step == 0
    return m.machine


def test_a_strangers_far_record_in_our_stage_does_not_make_us_resync():
    machine = _replica()
    honest = rec("s1r1", 0, [(0, A)])
    stranger = rec("x", 10**5, [(10**5, B)])
    machine.handle([ev.View({0: {}, 1: {"s1r1": honest, "x": stranger}, 2: {}})], 0.0)
    assert not machine.position.behind()
    # the same claim by the stage's replicas together: we are behind, and resync
    ahead = rec("s1r1", 5, [(4, A), (5, A)])
    other = rec("s1r2", 5, [(5, A)])
    machine.handle([ev.View({0: {}, 1: {"s1r1": ahead, "s1r2": other, "x": stranger}})], 0.0)
    assert machine.position.behind()


def test_far_step_data_from_a_stranger_whose_stage_does_not_agree_is_refused():
    machine = _replica()
    stage0 = {
        "s0r0": rec("s0r0", 0, [(0, A)]),
        "s0r1": rec("s0r1", 0, [(0, A)]),
        "x": rec("x", 10**5, [(10**5, B)]),  # its own record, near the step it sends
    }
    machine.handle([ev.View({0: stage0, 1: {"s1r1": rec("s1r1", 0, [(0, A)])}})], 0.0)
    assert machine.refuses_step("x", "up", 10**5) is not None
    assert machine.refuses_step("s0r0", "up", 1) is None  # one ahead: normal, let in
    # stage 0's replicas agree they are at step 3: their data of step 3 is let in (we resync)
    stage0 = {n: rec(n, 3, [(3, A)]) for n in ("s0r0", "s0r1")}
    machine.handle([ev.View({0: stage0, 1: {"s1r1": rec("s1r1", 0, [(0, A)])}})], 0.0)
    assert machine.refuses_step("s0r0", "up", 3) is None
