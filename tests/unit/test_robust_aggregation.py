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


def within_bound(got, vectors, counts: list[int], good: list[int]) -> tuple[float, float]:
    """How far a taken round's mean gradient per microbatch is from the honest members'
    estimate, and robust.py's bound on it: within FAR R of some honest member's mean (plus,
    when nobody was clipped, the exact sum's distance from the estimate). Its loss per
    microbatch is checked here to lie within the honest members' range."""
    M = sum(counts)
    ys = torch.stack([vectors[i].double() / counts[i] for i in good])
    w = torch.tensor([math.sqrt(counts[i]) for i in good], dtype=torch.float64)
    estimate = (ys[:, :-1] * w[:, None]).sum(0) / w.sum()
    far = max(float((y - estimate).norm()) for y in ys[:, :-1]) + robust.FAR * got.radius
    exact = 0.0 if got.clipped else sum(math.sqrt(m) for m in counts) / M * got.radius
    mean = got.total.double() / M
    if got.clipped:  # the exact sum's loss is the members' own
        assert float(ys[:, -1].min()) - 1e-6 <= float(mean[-1]) <= float(ys[:, -1].max()) + 1e-6
    return float((mean[:-1] - estimate).norm()), far + exact


def check_bound(counts: list[int], bad: list[int], seeds: int = 5) -> None:
    """Whatever the members in `bad` send, the round is taken and its update's mean per
    microbatch stays within robust.py's bound of the honest members' estimate."""
    M = sum(counts)
    good = [i for i in range(len(counts)) if i not in bad]
    for seed in range(seeds):
        vectors = honest(counts, seed)
        ys = torch.stack([vectors[i].double() / counts[i] for i in good])
        box = (ys.max(0).values - ys.min(0).values).norm()  # the median lies inside it
        R_max = CLIP_FACTOR * max(math.sqrt(counts[i]) for i in good) * float(box)
        for name, attack in attacks(vectors[bad[0]], seed).items():
            sent = list(vectors)
            for i in bad:
                sent[i] = attack * counts[i] / counts[bad[0]]
            got = aggregate(sent, counts, M)
            assert got.total is not None and torch.isfinite(got.total).all(), (name, got.why)
            assert got.radius <= R_max
            moved, limit = within_bound(got, sent, counts, good)
            assert moved <= limit * (1 + 1e-6), (name, moved, limit)
            w = torch.tensor([math.sqrt(counts[i]) for i in good], dtype=torch.float64)
            estimate = (ys * w[:, None]).sum(0) / w.sum()
            undefended = float((sum(sent).double() / M - estimate).norm())
            if name in ("huge", "random"):  # far from what it would be undefended
                assert moved < (1e-2 if name == "huge" else 0.2) * undefended, name


@pytest.mark.parametrize("counts,bad", [([3, 5, 4], [1]), ([2, 8, 4, 6, 1], [0, 4])])
def test_a_hostile_minority_moves_the_update_by_at_most_the_clip_bound(counts, bad):
    check_bound(counts, bad)


@pytest.mark.parametrize(
    "counts,bad", [([2, 2, 58], [2]), ([1, 60, 1, 2], [1]), ([3, 40, 3, 2, 30], [1, 4])]
)
def test_a_hostile_member_claiming_most_of_the_steps_microbatches_is_still_outvoted(counts, bad):
    """Its claim is its own (the routing sends work where throughput is claimed): weighted by
    its microbatches it pulled the honest members outside their radius and wrote the update;
    its pull is now at most R, as every member's."""
    check_bound(counts, bad)


@pytest.mark.parametrize(
    "honest_counts,bad_counts",
    [([1, 1, 9], [9, 9]), ([1, 1, 1, 16], [16, 16, 16]), ([2, 2, 16], [16, 16])],
)
def test_hostile_members_claiming_the_largest_honest_count_cannot_drag_the_estimate(
    honest_counts, bad_counts
):
    """A review's attack on weights capped at the median count: hostile members, a minority,
    each claiming the largest honest count and sending a mean far along one direction, out-
    pulled honest members with small counts, clipped them all and moved the update 4-6x past
    the stated bound. Now each pull is at most R: the round is taken and its update within
    the bound, or, when half the members or more end far from it (3 of 7 hostile, pushing
    far), refused."""
    counts = honest_counts + bad_counts
    good, M = list(range(len(honest_counts))), sum(counts)
    g = torch.Generator().manual_seed(99)
    u = torch.randn(DIM + 1, generator=g, dtype=torch.float64)
    u /= u.norm()
    taken = 0
    for seed in range(5):
        vectors = honest(counts, seed)[: len(honest_counts)]
        ys = torch.stack([v.double() / m for v, m in zip(vectors, honest_counts, strict=True)])
        w = torch.tensor([math.sqrt(m) for m in honest_counts], dtype=torch.float64)
        estimate = (ys * w[:, None]).sum(0) / w.sum()
        spread = float((ys - estimate).norm(dim=1).max())
        for t in (1.0, 3.0, 10.0, 100.0, 1e4):
            sent = vectors + [((estimate + t * spread * u) * m).float() for m in bad_counts]
            got = aggregate(sent, counts, M)
            if got.total is None:  # pushed far by nearly half the members: a stall
                assert t > 10 and "no majority near" in got.why, (t, got.why)
                continue
            taken += 1
            moved, limit = within_bound(got, sent, counts, good)
            assert moved <= limit * (1 + 1e-6), (t, moved, limit)
    assert taken >= 15  # of 25


@pytest.mark.parametrize(
    "honest_counts,bad_counts", [([1, 1, 1, 64], [1, 1]), ([1, 1, 1, 64], [64, 64])]
)
def test_a_third_of_the_members_cannot_get_the_round_refused(honest_counts, bad_counts):
    """A review: with "near" meaning within FAR times a member's own radius R / sqrt(m), a
    hostile third pushing far moved the estimate past the large-count honest member's small
    radius, and every round was refused (10 of 10), until round_timeout_s. Near is now FAR R."""
    counts = honest_counts + bad_counts
    good, M = list(range(len(honest_counts))), sum(counts)
    g = torch.Generator().manual_seed(99)
    u = torch.randn(DIM + 1, generator=g, dtype=torch.float64)
    u /= u.norm()
    for seed in range(10):
        vectors = honest(counts, seed)[: len(honest_counts)]
        ys = torch.stack([v.double() / m for v, m in zip(vectors, honest_counts, strict=True)])
        spread = float((ys - ys.mean(0)).norm(dim=1).max())
        sent = vectors + [((ys.mean(0) + 100 * spread * u) * m).float() for m in bad_counts]
        got = aggregate(sent, counts, M)
        assert got.total is not None, got.why
        moved, limit = within_bound(got, sent, counts, good)
        assert moved <= limit * (1 + 1e-6)


def test_the_loss_sum_neither_clips_nor_refuses_honest_members():
    """The loss sum is the vector's last coordinate, on another scale than the gradients: with
    gradients less noisy than the per-microbatch losses, it alone set the spread, and honest
    members were clipped (82 of 300 rounds at counts [2, 8, 16, 32], a review) or their rounds
    refused. The clip is over the gradients alone."""
    counts = [2, 8, 16, 32]
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        mu = 0.1 * torch.randn(DIM, generator=g) / math.sqrt(DIM)
        vectors = [
            torch.cat(
                [
                    m * mu + 0.1 * math.sqrt(m / DIM) * torch.randn(DIM, generator=g),
                    (2.0 + 0.5 * torch.randn(m, generator=g)).sum().reshape(1),
                ]
            )
            for m in counts
        ]
        got = aggregate(vectors, counts, sum(counts))
        assert not got.clipped and torch.equal(got.total, robust._sum(vectors)), seed


@pytest.mark.parametrize("big", [16, 48, 64])
def test_honest_members_with_very_uneven_counts_are_not_clipped(big):
    """Weights capped at the median count clipped an honest member with 64 microbatches
    beside two with one (a review); its pull is sqrt(64) |y - v| like anyone's."""
    counts = [1, 1, big]
    for seed in range(20):
        vectors = honest(counts, seed)
        got = aggregate(vectors, counts, sum(counts))
        assert not got.clipped and torch.equal(got.total, vectors[0] + vectors[1] + vectors[2])


def test_members_claiming_most_microbatches_pulled_the_estimate_before_their_pull_was_bounded():
    counts = [2, 2, 58]
    vectors = honest(counts, 0)
    sent = [*vectors[:2], -100 * vectors[2]]
    ys = torch.stack([v.double() / m for v, m in zip(sent, counts, strict=True)])
    m = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    _, clipped, _ = robust.centered_clip(ys, m)  # weighted by the claims: honest ones clipped
    assert {0, 1} <= set(clipped)
    _, clipped, _ = robust.centered_clip(ys, m, m.sqrt())
    assert clipped == [2]


def test_a_non_finite_member_claiming_most_of_the_step_is_outvoted_by_three():
    counts = [2, 2, 2, 58]
    vectors = honest(counts, 3)
    vectors[3] = torch.full_like(vectors[3], float("nan"))
    got = aggregate(vectors, counts, 64)
    assert got.dropped == [3] and got.total is not None and torch.isfinite(got.total).all()
    mean = (vectors[0] + vectors[1] + vectors[2]).double() / 6
    assert torch.allclose(got.total.double(), 64 * mean, rtol=1e-4, atol=1e-6)


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
    m = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for w in (m, m.clamp(max=2.0)):
        v, clipped, _ = robust.centered_clip(ys, m, w)
        assert not clipped
        assert torch.allclose(v, (ys * w[:, None]).sum(0) / w.sum())
