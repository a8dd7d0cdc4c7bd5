"""Deterministic protocol scenarios (node/protocol/harness.py): the real stage machine and
runtime on a fake network and averager, checked against the reference trainer. Each seed in
FOUND is a protocol bug the harness found, kept as a regression test (docs/architecture.md,
"What the harness found")."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from node.protocol import harness, scenarios
from node.protocol.scenarios import FAMILIES, run_one

pytestmark = pytest.mark.unit

BEFORE_JOINS = ("kill", "flap", "stop", "partial")  # the families when those seeds were found
BEFORE_KILLS = ("flap", "stop", "partial", "join")  # the overlapped schedule's, until #11's kills


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10])
def test_kills_and_drains_end_with_the_reference_weights(seed):
    out = run_one(seed, ("kill", "stop"))
    assert out.ok, (out.shape, out.faults, out.problems)
    assert out.max_diff <= 1e-5


def test_one_replica_per_stage_is_bit_exact():
    out = run_one(2, ("kill", "stop"))  # S=2 R=1: no averaging, the reference's sums exactly
    assert out.shape.endswith("R=1") and out.ok and out.max_diff == 0.0


FOUND = {
    4: (
        BEFORE_JOINS,
        "stage 0's first round finished for one replica only: the other never learned the split",
    ),
    9: (
        BEFORE_JOINS,
        "a flap seen by one neighbour only: it took the peer for dead and the "
        "adopter redid work the live peer also did",
    ),
    5: (
        ("kill", "stop"),
        "a replica killed just before its last round: the other stages had "
        "exited, and nobody re-sent its microbatches",
    ),
    19: (
        BEFORE_JOINS,
        "a last-step round that finished for the others only: the replica left "
        "behind had nobody to resync from",
    ),
    26: (
        BEFORE_JOINS,
        "a draining replica whose round failed after its siblings finished "
        "waited for a round forever",
    ),
    28: (
        BEFORE_JOINS,
        "a stage-0 replica that resynced did not learn the step's split: its "
        "share was never dispatched",
    ),
    93: (
        BEFORE_JOINS,
        "a REPLAY_END naming a step ahead was taken for being behind: a resync "
        "threw away counted work",
    ),
    133: (
        BEFORE_JOINS,
        "a neighbour whose link was down when the others reported sent its "
        "replays after the adoption: they were dropped",
    ),
    305: (
        BEFORE_JOINS,
        "a finished replica left while a neighbour's link flapped: its STEP_DONE never came",
    ),
    422: (
        BEFORE_JOINS,
        "a replica that missed the bootstrap round formed a group alone while "
        "an in-sync one had split step 0",
    ),
    1395: (
        BEFORE_JOINS,
        "a drained replica left at once: its sibling whose round failed had nobody to resync from",
    ),
    1421: (
        BEFORE_JOINS,
        "the message that showed a replica was behind was dropped with the resync it caused",
    ),
    1999: (
        BEFORE_JOINS,
        "a replica left holding forwards of the next step: they were never answered",
    ),
    39: (FAMILIES, "a joiner left behind while unsynced never resynced"),
    1086: (
        FAMILIES,
        "a drained neighbour left before a dead replica's death was known: the "
        "gradient the adopter needed left with it",
    ),
    673: (
        FAMILIES,
        "a draining stage-1 replica left after its stage applied the step, holding the "
        "gradient of a stage-0 replica that then died at its round (the known gap until "
        "draining replicas stayed while upstream had not applied: leaving.owed_upstream)",
    ),
    # known gaps until joiners took only a state other replicas vouch for (#10 C2); never
    # diagnosed, and the harness draws differently since, so they may only be hidden
    2378: (FAMILIES, "a kill in stage 1, a drain in stage 0 and a join in stage 1"),
    3541: (FAMILIES, "a drain and a join in stage 0 near the run's end"),
}


@pytest.mark.parametrize("seed", sorted(FOUND))
def test_what_the_harness_found_stays_fixed(seed):
    families, what = FOUND[seed]
    out = run_one(seed, families, least=True)  # the window they were found with
    assert out.ok, (what, out.faults, out.problems)


# the overlapped schedule's (#11): (families, what was wrong); every family is FAMILIES
OVERLAPPED_FOUND = {
    155: (
        FAMILIES,
        "a stage-0 replica died holding the next step's early microbatches; its adopter, with "
        "no share of the dead one in the split, adopted at once and dispatched them again",
    ),
    5: (
        FAMILIES,
        "two deaths in a row after stage 1 applied the step: the z a dead stage-1 replica had "
        "sent a dead stage-2 replica existed nowhere (redone at the kept weights: adopt_past)",
    ),
    378: (
        FAMILIES,
        "a round that finished for one stage-1 replica only, which then died, and the "
        "stage-0 replica that had sent it a microbatch died too (stage 0 redoes it)",
    ),
    739: (
        FAMILIES,
        "a draining replica whose stage applied the step without it left with gradients "
        "its dead upstream replica's adopter needed (it stays now: leaving.owed_upstream)",
    ),
    1898: (
        FAMILIES,
        "a gradient of the next step for a dead stage-0 replica's forward came before the "
        "replays that open its adoption: refused, and the recomputed forward waited forever",
    ),
    1963: (
        FAMILIES,
        "a draining replica's link flapped while it held a dead upstream replica's work: "
        "taken for gone, it was not waited for, and the adopter recomputed what it held",
    ),
    1185: (
        FAMILIES,
        "a round finished for a joiner only; its donor retried alone and split the next step "
        "without it, so both sent one id and each waited for ever (flow.on_taken)",
    ),
    213: (
        BEFORE_KILLS,
        "a forward refused by a replica steps behind its siblings was never re-routed",
    ),
    293: (
        BEFORE_KILLS,
        "a draining replica whose round failed left with its share while a sibling lagged",
    ),
}


@pytest.mark.parametrize("seed", sorted(OVERLAPPED_FOUND))
def test_what_the_harness_found_on_the_overlapped_schedule_stays_fixed(seed):
    families, what = OVERLAPPED_FOUND[seed]
    out = run_one(seed, families, "overlapped", least=True)  # the window they were found with
    assert out.ok, (what, out.faults, out.problems)


@pytest.mark.parametrize(("at", "down_s"), [(8.0, 2.0), (7.0, 5.0)])
def test_splits_that_disagree_heal_while_the_first_senders_link_is_down(at, down_s):
    """Seed 1185 with the joiner's link to stage 1 cut when the donor's forward of the id both
    sent arrives: the refusal is ABORTED still (the joiner is not dead), or both wait for ever
    (a review's scenario; disputes.py)."""
    swarm, faults = scenarios.build(1185, FAMILIES, "overlapped")
    swarm._at(at, "fault", "cut", "s0r1", "s1r0", down_s)
    out = scenarios.run(swarm, faults, 1185)
    assert out.ok, out.problems
    taken = sum(m.machine.state.stats["taken_elsewhere"] for m in swarm.members.values())
    assert taken == 1  # the one id both sent, dropped once by its second sender


def test_a_hostile_downstream_replicas_aborted_strips_no_share():
    """ABORTED is the downstream node's word: stage 0 drops an id on it only while the DHT
    shows its replicas disagree about the step. A stage-1 replica that refuses every forward
    with it stalls the step as silence would (what a hostile neighbour on the data path can
    do anyway), but no stage-0 replica gives up an id of its share."""
    from node.protocol.harness import Swarm
    from node.wire.messages import MessageError

    swarm = Swarm(seed=5, stages=2, replicas=2, steps=2, mbs=4, partial_rounds=0.0)
    hostile = swarm.members["s1r1"].machine.flow

    def refuse(peer, side, msg):
        hostile.c.refuse(peer, MessageError(msg.id, "ABORTED", "mine"))

    hostile.on_forward = refuse
    scenarios.run(swarm, [])
    firsts = [m.machine.state for n, m in swarm.members.items() if n.startswith("s0")]
    assert sum(st.errors["peer_ABORTED"] for st in firsts) > 0
    assert [st.stats["taken_elsewhere"] for st in firsts] == [0, 0]


@pytest.mark.parametrize("jitter_seed", [1, 29])
def test_a_stage_past_the_step_upstream_applied_does_not_wait_for_a_dead_ones_step_done(
    jitter_seed, monkeypatch
):
    """Overlapped seed 792 under load: a stage-0 replica died at its round of the last step,
    which still counted; its sibling applied it and finished. The stage-1 replica had dropped
    the dead one's STEP_DONE at its death and waited for an adopter's that never came. Now
    the upstream stage's agreed records past the step cover it (machine._complete). The load
    is emulated: 0-20 ms more compute time a call (routing and the window read it), seeded;
    these two seeds stalled 0.12 in two of two sweeps of 30."""
    import random

    from node.protocol import core

    rng = random.Random(jitter_seed)
    real = core.Core.compute

    def loaded(self, fn, *args):
        out = real(self, fn, *args)
        self.state.compute_s += rng.uniform(0, 0.02)
        return out

    monkeypatch.setattr(core.Core, "compute", loaded)
    out = run_one(792, FAMILIES, "overlapped")
    assert out.ok, out.problems


def test_replicas_that_join_mid_run_end_with_the_reference_weights():
    outs = [run_one(seed, ("join",)) for seed in range(20)]
    assert sum(any(f.startswith("join") for f in o.faults) for o in outs) >= 4
    assert [(o.seed, o.problems) for o in outs if not o.ok] == []


def test_selftest_reports_a_failure_with_its_replay_command(capsys, monkeypatch):
    """No seed is known to fail: make every scenario's weight check impossible to meet."""
    from resbm.cli import main

    monkeypatch.setattr(scenarios, "ATOL", -1.0)
    code = main(["selftest", "protocol", "--seed", "2", "--scenarios", "1", "--faults", "kill"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL seed 2" in out and "resbm selftest protocol --seed 2 --scenarios 1" in out
    assert "differs from the reference" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["scenarios"] == 1 and last["failures"] == 1 and last["failed_seeds"] == [2]


def test_sixty_scenarios_of_every_fault_family_pass():
    """What CI runs of the selftest: a sample, for the suite's time (the CLI runs a thousand in
    about a minute; `resbm selftest protocol --scenarios 1000` before a change to node/ lands).
    Seeds 0-59 are not special: the named seeds above and below are the hard ones."""
    failed = [seed for seed in range(60) if not run_one(seed).ok]
    assert failed == []


def test_overlapped_scenarios_end_with_the_reference_weights():
    """#11: the overlapped schedule against its own reference rule, with one or two replicas a
    stage, kills, drains, flaps, partial rounds and joins, and messages that arrive in
    batches. Found this way: a flap must re-send the next step's microbatches begun early (1 of
    63 stalled); with batches a stage may see data three steps ahead (19 of 100 stalled before
    `_reach`); a resync kept only the next step's held messages and dropped those two steps
    ahead; a replica that resyncs keeps the early work it did at the same version, or its ids
    were counted without their gradients (half the two-replica scenarios); a draining replica
    that took the next step's work stays for it. Within float tolerance (ATOL_OVERLAPPED). And
    the overlap really happens."""
    outs, kinds, began, steps, pairs = [], Counter(), 0, 0, 0
    for seed in range(40):
        swarm, faults = scenarios.build(seed, FAMILIES, "overlapped")
        out = scenarios.run(swarm, faults, seed)
        outs.append(out)
        kinds.update(f.split()[0] for f in faults)
        pairs += swarm.R == 2
        late = [e for e in swarm.step_events if e["step"] > 0]
        # the last stage takes none early (runtime.stage_overlap)
        assert all(e["begun_early"] == 0 for e in late if e["stage"] == swarm.S - 1), seed
        early = [e["begun_early"] for e in late if e["stage"] == 0]
        began += sum(n > 0 for n in early)  # not always: a cut link may leave stage 0
        steps += len(early)  # nowhere to send
    assert [(o.seed, o.problems) for o in outs if not o.ok] == []
    assert began >= 0.8 * steps, (began, steps)
    assert min(kinds["kill"], kinds["flap"], kinds["stop"]) >= 3 and kinds["join"], kinds
    assert pairs >= 12, pairs


def test_the_overlapped_tolerance_sits_between_rounding_and_one_lost_microbatch():
    """The overlapped scenarios compare weights at ATOL_OVERLAPPED, not ATOL: their six steps
    grow the replicas' summation-order rounding. On the noisiest shape seen (seed 976: 3
    stages, 6 microbatches, overlap 2) the reference's own sums in eight shuffled orders stay
    well inside it, and losing one microbatch of the last step moves a stage past it: the check
    can fail."""
    import random

    from node.config import TrainConfig
    from node.protocol import harness
    from node.trainer import ReferenceTrainer

    S, steps, M, D = 3, 6, 6, 2
    reference = harness._shared(S, steps, M, D)[3]
    base = harness.tiny_config(S, steps, M, D)
    cfg = TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.model_fields})

    def moved(orders) -> float:
        torch.manual_seed(base["seed"])
        ref = ReferenceTrainer(cfg, progress=False)
        for step in range(steps):
            ref.train_step(orders(step))
        return max(
            (p.detach() - reference[k][n]).abs().max().item()
            for k, rt in enumerate(ref.runtimes)
            for n, p in rt.stage.named_parameters()
        )

    rng = random.Random(0)
    noise = max(moved(lambda _: rng.sample(range(M), M)) for _ in range(8))
    lost = moved(lambda step: [i for i in range(M) if (step, i) != (steps - 1, 0)])
    assert 0 < noise < scenarios.ATOL_OVERLAPPED / 2 and lost > scenarios.ATOL_OVERLAPPED, (
        noise,
        lost,
    )


@pytest.mark.parametrize("overlap", [0, 3], ids=["1f1b", "overlapped"])
def test_a_link_that_flaps_twice_while_its_work_is_redelivered_loses_nothing(overlap):
    """A review, with messages in batches: the second cut came while a node redelivered its
    own gradients replayed after the first, so it skipped them, yet kept the claims; the
    replay after the second relink was taken for a duplicate, and the step stalled (1f1b
    too). Unapplied claims are now forgotten, and the next replay reopens the adoption."""
    swarm = harness.Swarm(44, 3, 1, steps=6, mbs=3, partial_rounds=0.0, overlap=overlap)
    swarm.batch_s = 0.3
    for t, back in ((1.45, 1.24), (2.87, 2.55)):
        swarm._at(t, "fault", "cut", "s0r0", "s1r0", back)
    out = scenarios.run(swarm, ["flap s0r0-s1r0 twice"], 44)
    assert out.ok, out.problems
    assert out.max_diff <= 1e-5


# Liveness, not correctness: recoveries that waited out adopt_wait_s (45 s in a real swarm) for
# a report that never came. Each seed timed out before the fix named.
SLOW = {
    8: "a stage-0 replica's death: the next step waited for reports of a step nobody held",
    82: "the same, with two replicas per stage (a real swarm stalled 45 s after a ban)",
    9: "a flap seen by both ends: the self-adoption waited for neighbours that lost nothing",
    17: "the same, in a 3-stage swarm",
}


@pytest.mark.parametrize("seed", sorted(SLOW))
def test_a_death_or_a_flap_does_not_wait_out_adopt_wait_s(seed):
    out = run_one(seed, FAMILIES)
    assert out.ok, out.problems
    assert any(f.startswith(("kill", "flap")) for f in out.faults)
    assert out.timeouts == 0, (SLOW[seed], out.faults)


def test_a_round_sum_a_hostile_member_poisoned_is_refused_and_the_round_retried():
    """#10 C1: with two replicas there is no majority to outvote a hostile one: a vector with
    NaN, or a thousand times too large, makes the round's sum refused (not applied), the round
    is retried, and the run ends with the reference weights."""
    from node.protocol.harness import Swarm

    swarm = Swarm(0, 2, 2, partial_rounds=0.0)  # every member hears the poisoned round

    def nan(total):
        total[3] = float("nan")
        return total

    swarm.corruptions = {(0, 1): nan, (1, 2): lambda total: total * 1e3}
    out = scenarios.run(swarm, ["poisoned rounds: stage 0 step 1 (NaN), stage 1 step 2 (x1000)"])
    assert out.ok, out.problems
    assert not swarm.corruptions  # both were played
    refused = sorted((m.stage, m.machine.state.errors["bad_round"]) for m in swarm.members.values())
    assert refused == [(0, 1), (0, 1), (1, 1), (1, 1)]  # every member refused its stage's once


def test_a_leader_showing_each_replica_a_group_of_its_own_is_refused():
    """#10 C1: a hostile leader shows each of two honest replicas a group of two, itself and
    that replica, claiming the other's microbatches with a forged vector (1.5x theirs: within
    every bound). Each group's ids are complete and there is no majority to outvote it; the
    replicas never compare digests. Each refuses the round (the replica it averaged with at
    the step before is missing), the round is retried, and the run ends with the reference
    weights. (Without that check each replica applied a forged sum.)"""
    from node.protocol.harness import Swarm

    swarm = Swarm(0, 2, 2, partial_rounds=0.0)
    swarm.splits = {(0, 1): lambda total: total * 1.5, (1, 2): lambda total: total * 1.5}
    out = scenarios.run(swarm, ["a splitting leader: stage 0 step 1, stage 1 step 2"])
    assert out.ok, out.problems
    assert not swarm.splits  # both were played
    split = sorted((m.stage, m.machine.state.errors["round_split"]) for m in swarm.members.values())
    assert split == [(0, 1), (0, 1), (1, 1), (1, 1)]


def test_a_leader_splitting_replicas_from_their_first_round_is_refused():
    """#10 C1: the same split in a stage's first round (stage 1, step 0), before two replicas
    have averaged together: each refuses it because the other's sealed record vouches for the
    state it holds at that step (StepEnd.in_sync). (Without that check each applied a forged
    sum, the two diverged and the run never ended.)"""
    from node.protocol.harness import Swarm

    swarm = Swarm(0, 2, 2, partial_rounds=0.0)
    swarm.splits = {(1, 0): lambda total: total * 1.5}
    out = scenarios.run(swarm, ["a splitting leader: stage 1 step 0"])
    assert out.ok, out.problems
    assert not swarm.splits
    split = sorted((m.stage, m.machine.state.errors["round_split"]) for m in swarm.members.values())
    assert split == [(0, 0), (0, 0), (1, 1), (1, 1)]


def test_a_leader_splitting_a_joiner_from_its_first_round_is_refused():
    """#10 C1: a joiner's first round, after it downloaded the stage's state at step 1: the
    replicas it downloaded from vouch for that state at that step, so a group without them is
    refused (the two replicas refuse it too: they averaged together at step 0)."""
    from node.protocol import events as ev
    from node.protocol.harness import Swarm

    class FreshViews(Swarm):
        """The joiner reads the round with the DHT as it is then: records lag a tick here,
        and one that does not show its donors at its step yet expects nobody (in_sync)."""

        def _answer(self, name, result):
            if name == "s1r2":
                self._deliver(name, [ev.View(self._records(1)), ev.RoundDone(result, 0.0)])
            else:
                super()._answer(name, result)

    swarm = FreshViews(0, 2, 2, steps=4, partial_rounds=0.0)
    swarm._at(0.3, "fault", "join", 1)
    swarm.splits = {(1, 1, "s1r2"): lambda total: total * 1.5}  # the joiner's round
    out = scenarios.run(swarm, ["join stage 1 at 0.30s", "a splitting leader: stage 1 step 1"])
    assert out.ok, out.problems
    assert not swarm.splits
    joiner = swarm.members["s1r2"].machine.state
    assert joiner.loaded_step == 1 and joiner.errors["round_split"] == 1


def test_a_replica_whose_averaging_never_works_costs_its_siblings_a_delay_not_their_run():
    """Its siblings expect it in their first round (its record vouches for their state), and
    it never comes: at step 0 nobody is ahead for it to resync from, so they deadlocked until
    round_timeout_s ended one of them (a review). They stop insisting after half of it."""
    from node.protocol import harness
    from node.protocol.harness import Swarm

    class Mute(Swarm):
        def _average(self, m, e):
            if m.name == "s1r2":  # its averager reaches no group
                self._at(self.now + harness.WINDOW_S, "answer", m.name, None)
            else:
                super()._average(m, e)

    swarm = Mute(0, 2, 3, steps=3, partial_rounds=0.0)
    out = scenarios.run(swarm, ["s1r2's averaging never works"])
    assert out.ok, out.problems
    patience = swarm.cfgs[1].round_timeout_s / 2
    assert patience <= swarm.now < swarm.cfgs[1].round_timeout_s
    assert swarm.members["s1r0"].machine.state.errors["round_split"] > 0


def test_rounds_voided_for_long_do_not_use_up_the_split_checks_patience():
    """A review: the patience ran from the step's first failed round of any kind, so a member
    that voided stage 1's rounds (join, then not send) past half of round_timeout_s got one
    split taken, and the two replicas silently held different weights. It runs from the first
    round refused for a missing replica."""
    from node.protocol.harness import Swarm

    class Stall(Swarm):
        armed = False

        def _close(self, stage, gid):
            g = self.groups.get(stage)
            if g is not None and id(g) == gid and stage == 1 and g.members:
                step = next(iter(g.members.values())).info["step"]
                if step == 1 and self.now < 310.0:  # past the patience (300 s here)
                    g.failed = True
                elif step == 1 and not self.armed:
                    self.armed = True
                    self.splits[(1, 1)] = lambda total: total * 1.5
            super()._close(stage, gid)

    swarm = Stall(0, 2, 2, steps=3, partial_rounds=0.0)
    out = scenarios.run(swarm, ["stage 1's step-1 rounds voided for 310 s, then a split"])
    assert out.ok, out.problems
    assert swarm.armed and not swarm.splits  # the split was played, and refused
    assert all(
        m.machine.state.errors["round_split"] == 1 for m in swarm.members.values() if m.stage
    )


def test_three_replicas_outvote_a_hostile_one_whatever_it_sends():
    """#10 C1: with three replicas a hostile one's vector is clipped (node/protocol/robust.py):
    a vector a thousand times too large moves the weights no more than a plausible lie (zero,
    its own gradient reversed) does; every replica applies the same update, and the run goes on
    to its last step."""

    def play(corrupt) -> tuple[float, list[str], list]:
        from node.protocol.harness import Swarm

        swarm = Swarm(0, 2, 3, partial_rounds=0.0)
        swarm.corruptions = {(0, 1): corrupt}
        out = scenarios.run(swarm, ["a hostile stage-0 replica at step 1"])
        assert not swarm.corruptions
        stage0 = [m for m in swarm.members.values() if m.stage == 0]
        weights = [
            torch.cat([p.detach().flatten() for p in m.machine.core.runtime.stage.parameters()])
            for m in stage0
        ]
        assert all(torch.equal(w, weights[0]) for w in weights)  # the replicas agree exactly
        outvoted = [m.machine.state.errors["outvoted"] for m in stage0]
        return out.max_diff, out.problems, outvoted

    huge, problems, outvoted = play(lambda v: v * 1e3)
    assert outvoted == [1, 1, 1]  # every replica clipped the same member, once
    assert all("differs from the reference" in p for p in problems), problems
    plausible = max(play(lambda v: v * 0.0)[0], play(lambda v: -v)[0])
    assert 0 < huge <= 2 * plausible, (huge, plausible)


@pytest.mark.parametrize("poison", ["nan", "far-step", "junk"])
def test_a_poisoned_state_download_is_refused_and_the_joiner_syncs_from_an_honest_one(poison):
    """#10 C2: a joiner's state is a donor's word. NaN weights, a step no replica announces, or
    a malformed entry: refused (nothing loaded), and the joiner syncs later from another."""

    def poisoned(meta, tensors):
        meta, tensors = dict(meta), [t.clone() for t in tensors]
        if poison == "nan":
            tensors[0].view(-1)[0] = float("nan")
        elif poison == "far-step":
            meta["meta"] = {**meta["meta"], "step": 10**6}
        else:
            tensors[-1] = "not a tensor"
        return meta, tensors

    for seed in range(60):  # the first join scenario whose joiner downloads a state
        swarm, faults = scenarios.build(seed, ("join",))
        swarm.poison_state = poisoned
        out = scenarios.run(swarm, faults, seed)
        if swarm.poison_state is None:  # it was served
            break
    assert swarm.poison_state is None
    assert out.ok, (seed, out.problems)
    assert sum(m.machine.state.errors["bad_state"] for m in swarm.members.values()) == 1


@pytest.mark.parametrize("named", ["s1r1", "n-made-up"])
@pytest.mark.parametrize("seed", range(3))
def test_m2_a_neighbours_word_that_a_replica_died_does_not_stall_the_step(seed, named):
    """#10 M2: a REPLAY_END names a replica that died; one hostile neighbour's, naming a live
    replica of our stage (or an id nobody listed), opened an adoption that held every step for
    adopt_wait_s (45 s in a real swarm: nobody else ever reports on it). Now an adoption for a
    replica our view still lists online does not hold the step until the view confirms the
    death, nor one for an id no view listed; their replays are still kept (a neighbour that
    banned a live replica hands its work over; a joiner died before our view listed it)."""
    from node.protocol import events as ev
    from node.protocol.harness import Swarm
    from node.wire.messages import Notice
    from node.wire.messages import NoticeKind as NK

    swarm = Swarm(seed, stages=2, replicas=2, partial_rounds=0.0)
    for i in range(12):  # a stream of them, for this step and the next, all run long
        for step in range(swarm.steps + 1):
            fake = Notice(NK.replay_end, step, (), named)
            swarm._at(0.3 + 0.4 * i, "deliver", "s1r0", [ev.Received("s0r0", "up", fake)])
    out = scenarios.run(swarm, [f"s0r0 tells s1r0 that {named} died, again and again"], seed)
    assert out.ok, out.problems
    assert out.timeouts == 0  # no adoption waited out adopt_wait_s
    s = swarm.members["s1r0"].machine.state
    assert s.stats["unconfirmed_deaths"] > 0  # the lie was heard, and opened adoptions
    assert "s1r1" not in s.dead  # its word alone does not make a live replica dead


def test_a_seed_replays_the_same_run_however_slow_a_replica_computes():
    """A seed fixes the run: compute is timed by the harness's clock, not the machine's. With the
    real clock, a replica slowed by load announced a lower throughput, was routed fewer
    microbatches, and the run changed: a split test failed in a loaded CI run, not alone."""
    import time

    from node.protocol.harness import Swarm

    def replay(slow: str | None):
        swarm = Swarm(5, 2, 2, steps=6, mbs=8, partial_rounds=0.0)
        if slow:
            rt = swarm.members[slow].machine.core.runtime
            inner = rt.forward_backward
            rt.forward_backward = lambda *a, **k: (time.sleep(0.004), inner(*a, **k))[1]
        out = scenarios.run(swarm, [])
        assert out.ok, out.problems
        routed = {n: m.machine.state.stats["counted"] for n, m in swarm.members.items()}
        return swarm.now, routed

    now, routed = replay(None)
    assert routed["s1r0"] and routed["s1r1"]
    assert replay("s1r0") == (now, routed)
