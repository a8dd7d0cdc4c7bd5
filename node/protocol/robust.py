"""The stage's update from its replicas' vectors, robust to the hostile ones (#10 C1).

Every replica of a stage sends every other its whole vector (node/swarm/averaging.py): the
gradients it summed over its microbatches, then their loss sum. Each member then computes the
update itself, here, so no member writes another's result (in hivemind's all-reduce each member
reduces a slice for everyone, and a hostile one could return anything for it).

The rule is CenteredClip (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021), weighted by microbatches: member i's vector over its m_i microbatches
is a mean y_i = x_i / m_i with weight m_i, and the estimate v is the fixed point of

    v <- v + sum_i m_i clip_i(y_i - v) / sum_i m_i,   clip_i(z) = z min(1, r_i / |z|).

An honest mean over m microbatches deviates from the true one by about sigma / sqrt(m), so the
radius is r_i = R / sqrt(m_i), R = CLIP_FACTOR x (median over members of |y_j - c| sqrt(m_j)),
around the coordinate-wise median c. At the fixed point the clipped pulls cancel, so while the
honest members H are not clipped, hostile members B move the update from the honest estimate
(their weighted mean, times the step's M microbatches) by at most M / m_H x sum_B sqrt(m_b) x R,
whatever they send. With an honest majority R is at most CLIP_FACTOR x the largest honest
sqrt(m_h) |y_h - c|, and c lies within the honest members' range in every coordinate. When
nobody is clipped the fixed point is the weighted mean, and the update is exactly
the sum of the members' vectors: the swarm still equals the reference trainer.

With fewer than three members there is no majority to trust: the sum is used, behind the
plausibility check in stepend. A member whose vector is not finite is left out, and the rest
stand in for its microbatches only if they hold a majority of the step's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

CLIP_FACTOR = 4.0  # honest members' normalised deviations are alike (high dimensions)
MIN_ROBUST = 3  # members: with fewer, no majority
ITERATIONS = 50
TOLERANCE = 1e-7  # relative change of v that ends the iteration


@dataclass
class Aggregate:
    total: torch.Tensor | None  # the step's summed vector; None when the round is unusable
    clipped: list[int] = field(default_factory=list)  # members whose vector was clipped
    dropped: list[int] = field(default_factory=list)  # members left out (not finite)
    why: str = ""  # why total is None
    radius: float = math.inf  # R: member i's clip radius is R / sqrt(m_i)


def aggregate(vectors: list[torch.Tensor], counts: list[int], microbatches: int) -> Aggregate:
    """The step's summed vector from members' `vectors` over `counts` microbatches each (their
    ids were checked disjoint and covering the step's `microbatches`)."""
    finite = [bool(torch.isfinite(v).all()) for v in vectors]
    dropped = [i for i, ok in enumerate(finite) if not ok]
    kept = [i for i, ok in enumerate(finite) if ok and counts[i] > 0]
    if dropped:
        held = sum(counts[i] for i in kept)
        if 2 * held <= microbatches:
            return Aggregate(None, [], dropped, f"members {dropped} sent non-finite vectors")
    if not kept:
        return Aggregate(torch.zeros_like(vectors[0]), [], dropped)
    if len(kept) < MIN_ROBUST:
        total = _sum([vectors[i] for i in kept])
        if dropped:  # the rest's mean stands in for the dropped members' microbatches
            total = total * (microbatches / sum(counts[i] for i in kept))
        return Aggregate(total, [], dropped)
    xs = torch.stack([vectors[i].double() for i in kept])
    m = torch.tensor([float(counts[i]) for i in kept], dtype=torch.float64)
    v, clipped, radius = centered_clip(xs / m[:, None], m)
    if not clipped and not dropped:  # the exact sum
        return Aggregate(_sum([vectors[i] for i in kept]), [], dropped, radius=radius)
    total = (v * microbatches).to(vectors[0].dtype)
    return Aggregate(total, [kept[j] for j in clipped], dropped, radius=radius)


def centered_clip(ys: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, list[int], float]:
    """The weighted CenteredClip estimate of the rows `ys` (means over `weights` samples each),
    the rows it clipped at the fixed point, and R."""
    center = ys.median(dim=0).values
    scale = weights.sqrt()
    R = CLIP_FACTOR * max(float(((ys - center).norm(dim=1) * scale).median()), 1e-30)
    radius = R / scale
    v = center
    for _ in range(ITERATIONS):
        dist = (ys - v).norm(dim=1)
        keep = torch.clamp(radius / dist.clamp_min(1e-300), max=1.0)
        step = ((ys - v) * (weights * keep)[:, None]).sum(0) / weights.sum()
        v = v + step
        if float(step.norm()) <= TOLERANCE * max(float(v.norm()), 1e-30):
            break
    dist = (ys - v).norm(dim=1)
    clipped = [j for j in range(len(ys)) if float(dist[j]) > float(radius[j]) * (1 + 1e-9)]
    return v, clipped, R


def _sum(vectors: list[torch.Tensor]) -> torch.Tensor:
    """In the members' order (sorted by node id): every replica adds in the same order, so
    their updates are identical to the bit."""
    total = vectors[0].clone()
    for v in vectors[1:]:
        total += v
    return total
