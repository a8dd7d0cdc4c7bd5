"""The reference trainer's overlapped rule (#11, node/trainer.py): on stage k, step t's first
D_k microbatches are computed at the weights before step t-1's update (extrapolated by the
update before it, times predict_scale, with predict_weights), the rest at w_t, and their sum
is applied to w_t. Checked against the rule written out by hand on 1f1b runtimes (plain
forwards at weights loaded in place), to the bit."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from node.config import TrainConfig
from node.runtime import stage_overlap
from node.trainer import ReferenceTrainer
from tests.helpers import tiny_model

pytestmark = pytest.mark.unit

M = 3


def config(schedule: str, steps: int = 4, **over) -> TrainConfig:
    base = dict(
        model=tiny_model(n_stages=3, n_layers=3),  # stage 1 runs ceil(D / 2) early
        steps=steps,
        batch_size=2,
        microbatches=M,
        eval_every=0,
        eval_batches=1,
        threads=1,
        schedule=schedule,
    )
    return TrainConfig(**{**base, **over})


def weights(trainer: ReferenceTrainer) -> list[list[torch.Tensor]]:
    return [rt.weights() for rt in trainer.runtimes]


def same(a, b) -> bool:
    return all(
        torch.equal(x, y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)
    )


def run(trainer: ReferenceTrainer, step: int, ids) -> None:
    """Microbatches `ids` of `step` through every stage at the weights in place."""
    *senders, last = trainer.runtimes
    for i in ids:
        mb = trainer.batches.microbatch(step, i)
        z = None
        for rt in senders:
            z = rt.forward(mb, z)
        grad = last.forward_backward(mb, z).grad_input
        for rt in reversed(senders):
            grad = rt.backward(mb.id, grad)


def by_hand(D: int, predict: float, steps: int = 4) -> list[list[list[torch.Tensor]]]:
    """The rule on a 1f1b trainer: each step's weights after its update. Stage k runs the
    step's first D_k = stage_overlap(D, k, S) microbatches at its early version: the ids go in
    groups between those bounds, each stage at the version its bound gives the group."""
    t = ReferenceTrainer(config("1f1b"), progress=False)
    S = len(t.runtimes)
    bounds = [stage_overlap(D, k, S) for k in range(S)]
    older = prev = weights(t)  # w_{t-2}, w_{t-1}
    out = []
    for step in range(steps):
        current = weights(t)
        ds = bounds if step > 0 else [0] * S
        cuts = sorted({0, M, *ds})
        stashed: list = [None] * S  # a stage's early gradients, once its early ids are done
        for lo, hi in pairwise(cuts):
            for rt, d, p, o, w in zip(t.runtimes, ds, prev, older, current, strict=True):
                early = [a + predict * (a - b) for a, b in zip(p, o, strict=True)] if predict else p
                rt.load_weights(early if hi <= d else w)
            run(t, step, range(lo, hi))
            for k, (rt, d) in enumerate(zip(t.runtimes, ds, strict=True)):
                if hi == d:  # its early ids are done: their sum is added last (fold_early)
                    stashed[k] = [p.grad.clone() for p in rt.stage.parameters()]
                    for opt in rt.optimizers:
                        opt.zero_grad(set_to_none=True)
        for rt, gs, w in zip(t.runtimes, stashed, current, strict=True):
            rt.load_weights(w)  # the update applies to w_t (D_k = M ends at the early version)
            for p, g in zip(rt.stage.parameters(), gs or [], strict=False):
                p.grad = g if p.grad is None else p.grad.add_(g)
        older, prev = prev, current
        for rt in t.runtimes:
            rt.losses.clear()
            rt.step(step)
        out.append(weights(t))
    return out


@pytest.mark.parametrize("D,predict", [(M, 0.0), (1, 0.0), (2, 1.0), (M, 1.0), (2, 0.5), (M, 0.25)])
def test_overlapped_computes_each_microbatch_at_the_weights_its_rule_gives(D, predict):
    want = by_hand(D, predict)
    rule = {"predict_weights": bool(predict), "predict_scale": predict or 0.5}
    got = ReferenceTrainer(config("overlapped", overlap=D, **rule), progress=False)
    for step, w in enumerate(want):
        got.train_step()
        assert same(weights(got), w), step


def test_overlap_zero_is_1f1b_and_overlap_changes_the_second_step_on():
    """Step 0 has no earlier weights: every rule agrees on it. Overlap 0 is 1f1b itself."""
    a = ReferenceTrainer(config("overlapped", overlap=1), progress=False)
    b = ReferenceTrainer(config("1f1b"), progress=False)
    c = ReferenceTrainer(config("overlapped", overlap=0), progress=False)
    assert a.train_step() == b.train_step() == c.train_step()
    assert same(weights(a), weights(b))
    assert a.train_step() != b.train_step() == c.train_step()
    assert same(weights(b), weights(c))


def test_an_overlapped_run_trains_and_says_its_rule():
    out = ReferenceTrainer(config("overlapped", steps=30, overlap=2), progress=False).run()
    assert (out["schedule"], out["overlap"], out["predict_weights"]) == ("overlapped", 2, True)
    assert out["loss_history"][-1] < out["loss_history"][0]
    assert ReferenceTrainer(config("overlapped"), progress=False).run()["overlap"] == M


def test_bad_overlap_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="--overlap"):
        config("1f1b", overlap=1)
    with pytest.raises(ValueError, match="--microbatches"):
        config("overlapped", overlap=M + 1)
    with pytest.raises(ValueError, match="schedule"):
        config("gpipe")


def test_an_overlapped_checkpoint_resumes_exactly_and_only_with_its_rule(tmp_path):
    """A checkpoint holds the early version and the last update besides the weights: two steps,
    saved, resumed for two more, are the four steps run at once, to the bit. Resumed with
    another rule (a review: without --schedule it went on as 1f1b), it is refused by name."""
    lr = {"optim": {"total_steps": 4}}  # one lr schedule for the run, stopped or not
    straight = ReferenceTrainer(config("overlapped", steps=4, overlap=2, **lr), progress=False)
    straight.run()
    first = config("overlapped", steps=2, overlap=2, checkpoint_dir=tmp_path, **lr)
    ReferenceTrainer(first, progress=False).run()
    again = config("overlapped", steps=4, overlap=2, checkpoint_dir=tmp_path, resume=True)
    resumed = ReferenceTrainer(again, progress=False)
    assert resumed.step == 2
    resumed.run()
    assert same(weights(resumed), weights(straight))
    for other in (config("1f1b", steps=4), config("overlapped", steps=4, overlap=1),
                  config("overlapped", steps=4, overlap=2, predict_weights=False),
                  config("overlapped", steps=4, overlap=2, predict_scale=0.5)):  # fmt: skip
        other = other.model_copy(update={"checkpoint_dir": tmp_path, "resume": True})
        with pytest.raises(ValueError, match="is of a --schedule overlapped --overlap 2 --pre"):
            ReferenceTrainer(other)


def test_a_checkpoint_from_before_the_scale_is_of_the_whole_update_rule():
    """Checkpoints saved before predict_scale existed extrapolated by the whole update: they are
    read as --predict-scale 1.0 (the default), and refused by a run at another scale."""
    from node.trainer import _rule

    old = {"schedule": "overlapped", "microbatches": M, "overlap": 2, "predict_weights": True}
    assert _rule(old) == ("overlapped", 2, 1.0)
    assert _rule(config("overlapped", overlap=2).model_dump(mode="json")) == _rule(old)
    half = config("overlapped", overlap=2, predict_scale=0.5).model_dump(mode="json")
    assert _rule(half) == ("overlapped", 2, 0.5)
    assert _rule({**old, "predict_weights": False}) == ("overlapped", 2, 0.0)


def test_a_replicas_state_carries_the_versions_and_loads_only_into_its_rule():
    """What a joiner downloads (and a checkpoint holds): the weights, the optimizer, and the
    overlapped rule's early version and last update. Loaded into another runtime, that one
    trains on exactly as the donor; a 1f1b runtime refuses it, naming the setting."""
    from node import checkpoint

    donor = ReferenceTrainer(config("overlapped", overlap=2), progress=False)
    joiner = ReferenceTrainer(config("overlapped", overlap=2), progress=False)
    for _ in range(2):
        donor.train_step()
    for _ in range(3):  # another state: its own weights, optimizer and versions
        joiner.train_step()
    for a, b in zip(donor.runtimes, joiner.runtimes, strict=True):
        tensors, meta = checkpoint.stage_state(a, 2)
        tensors = {n: t.clone() for n, t in tensors.items()}  # as downloaded: not the donor's
        assert any(n.startswith("early.") for n in tensors) == (a.overlap > 0)
        assert checkpoint.load_stage_state(b, tensors, meta) == 2
    joiner.step = 2
    donor.train_step(), joiner.train_step()
    assert same(weights(donor), weights(joiner))
    plain = ReferenceTrainer(config("1f1b"), progress=False).runtimes[0]
    with pytest.raises(ValueError, match="--schedule overlapped"):
        checkpoint.load_stage_state(plain, *checkpoint.stage_state(donor.runtimes[0], 3))
    overlapped = ReferenceTrainer(config("overlapped", overlap=2), progress=False).runtimes[0]
    with pytest.raises(ValueError, match="no early version"):
        checkpoint.load_stage_state(overlapped, *checkpoint.stage_state(plain, 3))


@pytest.mark.parametrize("schedule", ["1f1b", "overlapped"])
def test_a_finished_steps_forwards_are_redone_at_its_weights_to_the_bit(schedule):
    """StageRuntime.forward_past: once step t is applied, a stage (not the last) still gives
    every microbatch of step t the z it sent then, early ones at their version included (what
    a dead downstream replica's adopter needs when the replica of ours that sent it died too:
    protocol/redo.py); no parameter gradient is left, and another step is refused by name."""
    rule = dict(overlap=2, predict_weights=True) if schedule == "overlapped" else {}
    t = ReferenceTrainer(config(schedule, **rule), progress=False)
    *senders, last = t.runtimes
    for rt in t.runtimes:
        rt.keep_past = True
    for step in range(2):
        sent = {}
        for i in range(M):
            mb = t.batches.microbatch(step, i)
            z = None
            for k, rt in enumerate(senders):
                z_in, z = z, rt.forward(mb, z)
                sent[k, i] = (mb, z_in, z)
            grad = last.forward_backward(mb, z).grad_input
            for rt in reversed(senders):
                grad = rt.backward(mb.id, grad)
        for rt in t.runtimes:
            rt.step(step)
        assert last.past is None  # the last stage sends no z: it keeps nothing
        for (k, _), (mb, z_in, z) in sent.items():
            redone = senders[k].forward_past(mb, z_in)
            assert torch.equal(redone, z) and not redone.requires_grad, (step, k, mb.id)
        assert all(p.grad is None for rt in t.runtimes for p in rt.stage.parameters())
    with pytest.raises(ValueError, match="keeps no weights of step 0"):
        senders[0].forward_past(t.batches.microbatch(0, 0))
