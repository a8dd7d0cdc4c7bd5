"""#10 C1: the stage's update from its replicas' vectors (node/protocol/robust.py). Honest
members get exactly their sum; a hostile minority moves it by at most the clip bound, whatever it
sends; a non-finite vector is left out."""

from __future__ import annotations

import math

import pytest
import torch

from node.protocol import robust
from node.protocol.robust import CLIP_FACTOR, aggregate

pytestmark = pytest.mark.unit

DIM = 4000


def honest(counts: list[int], seed: int, sigma: float = 3.0) -> list[torch.Tensor]:
    """Members' sums over their microbatches: a shared gradient plus per-microbatch noise
    larger than it, as a small batch's is; the loss sum last."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(DIM, generator=g)
    grads = [m * mu + sigma * math.sqrt(m) * torch.randn(DIM, generator=g) for m in counts]
    return [torch.cat([x, torch.tensor([5.0 * m])]) for x, m in zip(grads, counts, strict=True)]


@pytest.mark.parametrize("counts", [[4, 4, 4], [1, 8, 8], [8, 1, 3, 4], [2, 2, 2, 2, 2, 2]])
def test_honest_members_get_exactly_their_sum_in_node_order(counts):
    for seed in range(20):
        vectors = honest(counts, seed)
        got = aggregate(vectors, counts, sum(counts))
        assert not got.clipped and not got.dropped, (seed, got.clipped)
        want = vectors[0].clone()
        for v in vectors[1:]:
            want += v
        assert torch.equal(got.total, want)  # the same additions, in the same order: bit equal


def attacks(v: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    return {
        "huge": torch.full_like(v, 1e30),
        "reversed": -100 * v,
        "random": 1e4 * torch.randn(v.shape, generator=g),
        "small shift": v + 2.0 * v.norm() / math.sqrt(v.numel()),  # just outside the honest
        "zero": torch.zeros_like(v),
    }


@pytest.mark.parametrize("counts,bad", [([3, 5, 4], [1]), ([2, 8, 4, 6, 1], [0, 4])])
def test_a_hostile_minority_moves_the_update_by_at_most_the_clip_bound(counts, bad):
    M = sum(counts)
    good = [i for i in range(len(counts)) if i not in bad]
    for seed in range(5):
        vectors = honest(counts, seed)
        ys = torch.stack([vectors[i].double() / counts[i] for i in good])
        w = torch.tensor([float(counts[i]) for i in good])
        mean = (ys * w[:, None]).sum(0) / w.sum()  # the honest members' estimate
        box = (ys.max(0).values - ys.min(0).values).norm()  # the median lies inside it
        R_max = CLIP_FACTOR * max(math.sqrt(counts[i]) for i in good) * float(box)
        for name, attack in attacks(vectors[bad[0]], seed).items():
            sent = list(vectors)
            for i in bad:
                sent[i] = attack * counts[i] / counts[bad[0]]
            got = aggregate(sent, counts, M)
            assert got.total is not None and torch.isfinite(got.total).all()
            assert not set(got.clipped) & set(good), (name, got.clipped)
            assert got.radius <= R_max
            limit = M / float(w.sum()) * sum(math.sqrt(counts[i]) for i in bad) * got.radius
            moved = float((got.total.double() - M * mean).norm())
            assert moved <= limit * (1 + 1e-6), (name, moved, limit)
            undefended = float((sum(sent).double() - M * mean).norm())
            if name in ("huge", "random"):
                assert moved < 1e-2 * undefended, name


def test_a_non_finite_member_is_left_out_and_the_rest_stand_in_for_it():
    counts = [4, 4, 4]
    vectors = honest(counts, 0)
    vectors[2] = vectors[2].clone()
    vectors[2][7] = float("nan")
    got = aggregate(vectors, counts, 12)
    assert got.dropped == [2]
    rest = vectors[0] + vectors[1]
    assert torch.allclose(got.total, rest * 12 / 8)


def test_a_non_finite_member_holding_half_the_step_voids_the_round():
    counts = [4, 4]
    vectors = honest(counts, 0)
    vectors[1] = torch.full_like(vectors[1], float("inf"))
    got = aggregate(vectors, counts, 8)
    assert got.total is None and got.dropped == [1] and "non-finite" in got.why


def test_two_members_are_summed_there_is_no_majority_to_trust():
    counts = [3, 5]
    vectors = honest(counts, 1)
    vectors[1] = vectors[1] * 1e6  # stepend's plausibility check is what refuses this
    got = aggregate(vectors, counts, 8)
    assert not got.clipped and torch.equal(got.total, vectors[0] + vectors[1])


def test_members_that_counted_nothing_have_no_weight():
    counts = [0, 4, 4, 4]
    vectors = honest([1, 4, 4, 4], 2)
    vectors[0] = torch.full_like(vectors[0], 1e30)  # a member with no microbatches: ignored
    got = aggregate(vectors, counts, 12)
    assert not got.clipped and torch.equal(got.total, vectors[1] + vectors[2] + vectors[3])


def test_centered_clip_fixed_point_is_the_weighted_mean_without_outliers():
    ys = torch.tensor([[1.0, 2.0], [1.1, 2.1], [0.9, 1.9]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    v, clipped, _ = robust.centered_clip(ys, w)
    assert not clipped
    assert torch.allclose(v, (ys * w[:, None]).sum(0) / w.sum())
