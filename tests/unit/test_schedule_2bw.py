"""The reference trainer's 2bw rule (#11): step t's gradients are computed at the weights before
the last update, w_{t-1}, and applied to w_t (node/trainer.py). Checked against the rule
written out by hand with the same stage runtimes, to the bit."""

from __future__ import annotations

import pytest
import torch

from node.config import TrainConfig
from node.trainer import ReferenceTrainer
from tests.helpers import tiny_model

pytestmark = pytest.mark.unit


def config(schedule: str, steps: int = 4, **over) -> TrainConfig:
    base = dict(
        model=tiny_model(n_stages=2, n_layers=2),
        steps=steps,
        batch_size=2,
        microbatches=2,
        eval_every=0,
        eval_batches=1,
        threads=1,
        schedule=schedule,
    )
    return TrainConfig(**{**base, **over})


def weights(trainer: ReferenceTrainer) -> list[torch.Tensor]:
    return [w for rt in trainer.runtimes for w in rt.weights()]


def gradients_at(trainer: ReferenceTrainer, step: int) -> list[torch.Tensor]:
    """`step`'s summed gradients at the trainer's current weights, as train_step computes
    them (the same runtimes, microbatches and order); the weights are left as they were."""
    trainer.accumulate(step)
    trainer.runtimes[-1].step_losses = []
    grads = [p.grad.clone() for rt in trainer.runtimes for p in rt.stage.parameters()]
    for rt in trainer.runtimes:
        for opt in rt.optimizers:
            opt.zero_grad(set_to_none=True)
    return grads


def test_2bw_applies_each_steps_gradient_from_the_weights_one_update_old():
    got = ReferenceTrainer(config("2bw"), progress=False)
    stale = ReferenceTrainer(config("1f1b"), progress=False)  # only computes gradients
    want = ReferenceTrainer(config("1f1b"), progress=False)  # applies them
    before = weights(want)  # w_{t-1}; at step 0, w_0
    for t in range(4):
        for rt, w in zip(stale.runtimes, _split(stale, before), strict=True):
            rt.load_weights(w)
        grads = gradients_at(stale, t)
        current = weights(want)
        params = [p for rt in want.runtimes for p in rt.stage.parameters()]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        for rt in want.runtimes:
            rt.step(t)
        before = current
        got.train_step()
        for a, b in zip(weights(got), weights(want), strict=True):
            assert torch.equal(a, b), t


def _split(trainer: ReferenceTrainer, flat: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """A flat list of every stage's weights, per stage."""
    out, i = [], 0
    for rt in trainer.runtimes:
        n = len(list(rt.stage.parameters()))
        out.append(flat[i : i + n])
        i += n
    return out


def test_2bw_and_1f1b_agree_on_the_first_update_and_part_after():
    """Step 0's gradients are at w_0 in both rules; step 1's are at w_0 in 2bw, at w_1 in
    1f1b: the first losses and updates agree exactly, the second ones do not."""
    a = ReferenceTrainer(config("2bw"), progress=False)
    b = ReferenceTrainer(config("1f1b"), progress=False)
    assert a.train_step() == b.train_step()
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))
    assert a.train_step() != b.train_step()  # step 1's microbatches at w_0, and at w_1
    assert not all(torch.equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))


def test_a_2bw_run_trains_and_says_its_schedule():
    out = ReferenceTrainer(config("2bw", steps=30), progress=False).run()
    assert out["schedule"] == "2bw"
    assert out["loss_history"][-1] < out["loss_history"][0]


def test_schedules_that_nodes_do_not_run_are_refused_by_name(tmp_path):
    from coordinator.config import CoordinatorConfig
    from node.node_config import NodeConfig
    from resbm.simulate import SimulateConfig

    with pytest.raises(ValueError, match="--resume with --schedule 2bw"):
        config("2bw", resume=True, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="schedule"):
        NodeConfig(model=tiny_model(n_stages=2, n_layers=2), schedule="2bw")
    with pytest.raises(ValueError, match="schedule"):  # its manifest would let nobody join
        CoordinatorConfig(model=tiny_model(n_stages=2, n_layers=2), schedule="2bw")
    with pytest.raises(ValueError, match="resbm train --schedule 2bw"):
        SimulateConfig(model=tiny_model(n_stages=2, n_layers=2), schedule="2bw")
    with pytest.raises(ValueError, match="schedule"):
        config("gpipe")


def test_a_2bw_checkpoint_is_not_resumed_as_1f1b(tmp_path):
    """A review: resumed without --schedule, a 2bw run went on as 1f1b and said so, its first
    steps' rule forgotten. It cannot be resumed (the stash is not in a checkpoint)."""
    ReferenceTrainer(config("2bw", steps=2, checkpoint_dir=tmp_path), progress=False).run()
    with pytest.raises(ValueError, match="is of a --schedule 2bw run"):
        ReferenceTrainer(config("1f1b", steps=4, checkpoint_dir=tmp_path, resume=True))
