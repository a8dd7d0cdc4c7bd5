"""Stage 0's in-flight window, sized at run time from the measured round trip and compute time
within a memory bound (#11, node/protocol/window.py). Times are multiples of 1/64 s: exact in
binary, so a ceil never lands one off."""

from __future__ import annotations

import pytest

from node.data import MicrobatchId
from node.model.presets import memory_estimate
from node.node_config import NodeConfig
from node.protocol.harness import Swarm
from node.protocol.scenarios import run
from node.protocol.window import Window, memory_cap, microbatch_bytes

T = 1 / 64


def timed(window: Window, sent_every: float, back_after: float, n: int, step: int = 0) -> None:
    for i in range(n):
        window.on_sent(MicrobatchId(step, i), i * sent_every)
    for i in range(n):
        window.on_gradient(MicrobatchId(step, i), i * sent_every + back_after)


def test_the_window_is_the_round_trip_over_the_pace_within_floor_and_cap():
    w = Window()
    assert w.size(4, 20, T) == 4  # nothing measured yet: the schedule's own
    timed(w, T, 32 * T, 8)  # one a 1/64 s, each back half a second later
    assert w.round_trip_s == 32 * T
    assert w.size(4, 64, T) == 32  # half a second of microbatches in flight
    assert w.size(4, 20, T) == 20  # the memory bound wins
    assert w.size(40, 64, T) == 40  # never below the schedule's
    assert w.size(4, 64, 4 * T) == 8  # stage 0 itself takes 4/64 s a microbatch


def test_a_queue_does_not_widen_it_and_a_slower_stage_narrows_it():
    w = Window()
    timed(w, T, 32 * T, 8)
    timed(w, T, 48 * T, 8, step=1)  # the same trips behind a queue: the least one counts
    assert w.size(1, 64, T) == 32
    slow = Window()  # gradients come back one every 4/64 s: a later stage's pace
    timed(slow, 4 * T, 32 * T, 8)
    assert slow.size(1, 64, T) == 8


def test_forwards_of_finished_steps_are_forgotten_and_a_resend_restarts_the_clock():
    w = Window()
    w.on_sent(MicrobatchId(0, 0), 0.0)
    w.on_sent(MicrobatchId(1, 0), 0.0)
    w.forget(1)
    assert list(w.sent) == [MicrobatchId(1, 0)]
    w.on_sent(MicrobatchId(1, 0), 8 * T)  # re-sent: its first trip was lost
    w.on_gradient(MicrobatchId(1, 0), 10 * T)
    w.on_gradient(MicrobatchId(0, 0), 11 * T)  # forgotten: no trip measured
    assert list(w.rtts) == [2 * T]


def test_the_memory_bound_is_the_budget_over_one_microbatchs_activations():
    assert memory_cap(1.0, 300 * 1024, 25) == 3
    assert memory_cap(1.0, 4 << 20, 25) == 1  # never below one
    assert memory_cap(4096.0, 1 << 20, 25) == 25  # nor above what the schedule could use
    assert memory_cap(1.0, None, 25) == 25  # not measured yet


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_microbatchs_bytes_are_the_estimate_of_the_stage_that_holds_most(precision):
    """presets.memory_estimate is checked against what autograd saves (test_presets.py); the
    last stage runs each microbatch's forward and backward at once and holds none in flight."""
    model = {"d_model": 64, "n_heads": 2, "n_layers": 3, "n_stages": 3, "seq_len": 32}
    cfg = NodeConfig(model=model, batch_size=4, microbatches=2, precision=precision)
    per = [
        memory_estimate(cfg.model, k, batch_size=4, in_flight=1, precision=precision)
        for k in range(3)
    ]
    held = [e["activations"] + e["weight_copies"] for e in per]
    assert microbatch_bytes(cfg) == int(max(held[:2])) > 0
    twice = NodeConfig(model=model, batch_size=8, microbatches=2, precision=precision)
    assert microbatch_bytes(cfg) < microbatch_bytes(twice) <= 2 * microbatch_bytes(cfg)


def test_in_the_harness_the_window_widens_past_the_schedules_and_the_swarm_is_exact():
    """Links of 1-50 ms, compute of a few ms: stage 0 keeps more than one microbatch a stage in
    flight, and the weights still equal the reference trainer's."""
    swarm = Swarm(seed=3, stages=2, replicas=1, steps=3, mbs=6, partial_rounds=0.0)
    out = run(swarm, [])
    assert out.ok, out.problems
    first = [e for e in swarm.step_events if e["stage"] == 0]
    assert [e["step"] for e in first] == [0, 1, 2]
    assert first[-1]["window"] > 2 and first[-1]["round_trip_s"] > 0, first


def test_in_the_harness_the_memory_bound_wins_over_the_schedules_window():
    """A budget of one microbatch's activations: one in flight at a time (below 1F1B's S), and
    still the reference trainer's weights."""
    swarm = Swarm(seed=3, stages=2, replicas=1, steps=3, mbs=6, partial_rounds=0.0)
    core = swarm.members["s0r0"].machine.core
    one = microbatch_bytes(core.cfg) / (1 << 20)
    core.cfg = core.cfg.model_copy(update={"activation_memory_mb": 1.5 * one})
    out = run(swarm, [])
    assert out.ok, out.problems
    assert [e["window"] for e in swarm.step_events if e["stage"] == 0] == [1, 1, 1]
