"""The overlapped schedule in a real swarm (#11): real node processes over emulated WAN links,
each stage taking the next step's first microbatches before the step's update. The swarm must
still equal the reference trainer's overlapped rule (node/trainer.py) exactly as a 1f1b swarm
equals 1f1b's, and the overlap must really happen (each step's `begun_early`)."""

from __future__ import annotations

import pytest

from node.events import read_events
from node.trainer import ReferenceTrainer
from resbm.simulate import SimulateConfig, Swarm

pytestmark = pytest.mark.swarm
TINY = {"d_model": 64, "n_heads": 2, "seq_len": 32, "compression": 16}


def config(tmp_path, **over) -> SimulateConfig:
    base = dict(
        model={**TINY, "n_stages": 3, "n_layers": 3},
        batch_size=4,
        microbatches=4,
        threads=1,
        wire_codec="fp32",
        workdir=tmp_path / "sim",
        eval_batches=1,
        steps=8,
        schedule="overlapped",
    )
    return SimulateConfig(**{**base, **over})


def test_an_overlapped_fp32_swarm_equals_the_reference_trainers_rule(tmp_path):
    """A few microbatches early, at predicted weights, over a link with latency to hide. (The
    whole step early, PipeDream-2BW, and flaps: the harness, test_protocol_scenarios.py.)"""
    over = {"overlap": 2, "link": "100mbit:20ms"}
    cfg = config(tmp_path, **over)
    swarm = Swarm(cfg, cfg.workdir)
    result = swarm.run(progress=False)
    assert result["ok"], result["error"]
    expected = ReferenceTrainer(cfg.train_config(), progress=False).run()
    assert len(result["loss_history"]) == cfg.steps
    for got, want in zip(result["loss_history"], expected["loss_history"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    # the rule differs from 1f1b's from step 1 on: equal to it would mean no overlap at all
    exact = ReferenceTrainer(cfg.train_config().model_copy(update={"schedule": "1f1b",
        "overlap": None}), progress=False).run()  # fmt: skip
    assert abs(result["loss_history"][-1] - exact["loss_history"][-1]) > 1e-4
    # stage 0 began some of each step's first `overlap` forwards while the step before was
    # open, and the others took some of them early (a stage may also be there already)
    for node in swarm.nodes:
        steps = [e for e in read_events(node.events) if e["event"] == "step"]
        assert [e["step"] for e in steps] == list(range(cfg.steps))
        early = [e["begun_early"] for e in steps]
        assert early[0] == 0 and all(n <= cfg.overlap for n in early), (node.stage, early)
        if node.stage == 0:
            # at least one every step; all D only where the pipeline's pace allows: a turn
            # handles what arrived before it dispatches, so on a loaded machine a burst of
            # gradients can close the step before the second one goes (a CI run saw 1 at step 1)
            assert all(1 <= n <= cfg.overlap for n in early[1:]), early
            # its window, sized from the round trip it measured (at least the 4 one-way
            # delays of the fill and the drain, 80 ms, against a few ms of compute): past the
            # schedule's S + D, up to M + D (node/protocol/window.py); the loss equality
            # above holds whatever it was
            assert min(e["round_trip_s"] for e in steps[1:]) >= 4 * 0.020
            windows = [e["window"] for e in steps]
            assert max(windows) == cfg.microbatches + cfg.overlap, windows
        elif node.stage == 1:  # ceil(2 * 1/2) = 1 of them (runtime.stage_overlap)
            assert sum(early) > 0, (node.stage, early)
        else:  # the last stage has step t's gradients before step t+1 comes: none
            assert sum(early) == 0, (node.stage, early)


def test_replicas_and_a_sigkilled_one_train_exactly_on_the_overlapped_schedule(tmp_path):
    """Three stages, two replicas each: stage 0 splits each step keeping the ids each replica
    began early (routing.split_share), and a round runs while the next step's early
    microbatches go on (machine._ahead_in_round). A middle-stage replica SIGKILLed mid-backward
    at step 2, the next step's early microbatches in flight: its sibling redoes its part (at the
    version each microbatch runs at: a state's early version is a fixed tensor of its step,
    StageRuntime.versions). Nothing lost, and still the reference trainer's rule, step for step.
    (Kills at every point: `resbm selftest protocol --schedule overlapped`.)"""
    cfg = config(tmp_path, replicas=2, overlap=2, steps=5, fixed_stages=True)
    swarm = Swarm(cfg, cfg.workdir)
    result = swarm.run(progress=False, overrides={3: {"fail_at_step": 2, "fail_phase": "backward"}})
    assert result["ok"], result["error"]
    assert result["nodes_killed"] == 1 and result["microbatches_lost"] == 0
    assert result["microbatches_recomputed"] >= 1
    expected = ReferenceTrainer(cfg.train_config(), progress=False).run()
    for got, want in zip(result["loss_history"], expected["loss_history"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    for t in range(cfg.steps):  # stage 0's replicas: every round covered the step
        events = [e for n in swarm.nodes if n.stage == 0 for e in n.steps() if e["step"] == t]
        assert events and all(e["round_ids"] == list(range(cfg.microbatches)) for e in events)
    first = [e for n in swarm.nodes if n.stage == 0 for e in n.steps() if e["step"] > 0]
    assert sum(e["begun_early"] for e in first) > 0  # the overlap happened with replicas too
