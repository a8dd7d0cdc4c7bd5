"""The reference trainer's overlapped rule (#11, node/trainer.py): step t's first D microbatches
are computed at the weights before step t-1's update (extrapolated by the update before it with
predict_weights), the rest at w_t, and their sum is applied to w_t. Checked against the rule
written out by hand on 1f1b runtimes (plain forwards at weights loaded in place), to the bit."""

from __future__ import annotations

import pytest
import torch

from node.config import TrainConfig
from node.trainer import ReferenceTrainer
from tests.helpers import tiny_model

pytestmark = pytest.mark.unit

M = 3


def config(schedule: str, steps: int = 4, **over) -> TrainConfig:
    base = dict(
        model=tiny_model(n_stages=2, n_layers=2),
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


def by_hand(D: int, predict: bool, steps: int = 4) -> list[list[list[torch.Tensor]]]:
    """The rule on a 1f1b trainer: each step's weights after its update."""
    t = ReferenceTrainer(config("1f1b"), progress=False)
    older = prev = weights(t)  # w_{t-2}, w_{t-1}
    out = []
    for step in range(steps):
        current = weights(t)
        d = D if step > 0 else 0
        early = None
        if d:
            for rt, p, o in zip(t.runtimes, prev, older, strict=True):
                rt.load_weights([a + (a - b) for a, b in zip(p, o, strict=True)] if predict else p)
            run(t, step, range(d))
            early = [[p.grad.clone() for p in rt.stage.parameters()] for rt in t.runtimes]
            for rt, w in zip(t.runtimes, current, strict=True):
                for opt in rt.optimizers:
                    opt.zero_grad(set_to_none=True)
                rt.load_weights(w)
        run(t, step, range(d, M))
        if early is not None:
            for rt, gs in zip(t.runtimes, early, strict=True):
                for p, g in zip(rt.stage.parameters(), gs, strict=True):
                    p.grad = g if p.grad is None else p.grad.add_(g)
        older, prev = prev, current
        for rt in t.runtimes:
            rt.losses.clear()
            rt.step(step)
        out.append(weights(t))
    return out


@pytest.mark.parametrize("D,predict", [(M, False), (1, False), (2, True), (M, True)])
def test_overlapped_computes_each_microbatch_at_the_weights_its_rule_gives(D, predict):
    want = by_hand(D, predict)
    got = ReferenceTrainer(config("overlapped", overlap=D, predict_weights=predict), progress=False)
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
    with pytest.raises(ValueError, match="--resume with --schedule overlapped"):
        config("overlapped", resume=True, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="--overlap"):
        config("1f1b", overlap=1)
    with pytest.raises(ValueError, match="--microbatches"):
        config("overlapped", overlap=M + 1)
    with pytest.raises(ValueError, match="schedule"):
        config("gpipe")


def test_an_overlapped_checkpoint_is_not_resumed_as_1f1b(tmp_path):
    """A review: resumed without --schedule, a stale-weights run went on as 1f1b and said so,
    its rule forgotten. It cannot be resumed (the earlier weights are not in a checkpoint)."""
    ReferenceTrainer(config("overlapped", steps=2, checkpoint_dir=tmp_path), progress=False).run()
    with pytest.raises(ValueError, match="is of a --schedule overlapped run"):
        ReferenceTrainer(config("1f1b", steps=4, checkpoint_dir=tmp_path, resume=True))


def test_a_node_that_would_need_another_replicas_state_refuses_the_overlapped_schedule():
    """A download or a resync carries the current weights alone: the next step's early
    microbatches would run at the wrong ones. The node stops, saying why."""
    from node.errors import NodeFailed
    from node.protocol.harness import Swarm

    swarm = Swarm(0, 2, 1, overlap=2)
    sync = swarm.members["s1r0"].machine.sync
    with pytest.raises(NodeFailed, match="--schedule overlapped runs one replica per stage"):
        sync.resync()
    with pytest.raises(NodeFailed, match="one replica per stage"):
        sync.on_state({}, [])
    assert Swarm(0, 2, 1).members["s1r0"].machine.sync.resync() is None  # 1f1b: it may
