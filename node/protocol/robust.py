"""The stage's update from its replicas' vectors, robust to the hostile ones (#10 C1).

Every replica of a stage sends every other its whole vector (node/swarm/averaging.py): the
gradients it summed over its microbatches, then their loss sum. Each member then computes the
update itself, here, so no member writes another's result (in hivemind's all-reduce each member
reduces a slice for everyone, and a hostile one could return anything for it).

The rule is CenteredClip (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021), over microbatch means: member i's vector over its m_i microbatches
is a mean y_i = x_i / m_i, and the estimate v is the fixed point of

    v <- v + sum_i w_i clip_i(y_i - v) / sum_i w_i,   clip_i(z) = z min(1, r_i / |z|).

An honest mean over m microbatches deviates from the true one by about sigma / sqrt(m), so the
radius is r_i = R / sqrt(m_i), R = CLIP_FACTOR x (median over members of |y_j - c| sqrt(m_j)),
around the coordinate-wise median c. With an honest majority of members, c and R are set by
honest members: c lies within their range in every coordinate, and R is at most CLIP_FACTOR x
the largest honest sqrt(m_h) |y_h - c|.

A round is refused (None) unless more than half the members lie within FAR (2) x R of v; with
an honest majority one of them is honest, so in a round taken v is within 2R of an honest
member's mean, whatever the others send and whatever counts they claim; the update is v times
the step's M microbatches. (Within FAR times each member's own radius, R / sqrt(m_i), let a
third of the members stall the stage: an honest member with a large count has a small radius,
and a hostile minority's pulls moved v past it, a review.) When nobody is clipped the update is
exactly the sum of the members' vectors (the swarm still equals the reference trainer), and its
mean per microbatch is within sum_i sqrt(m_i) R / M of v.

All of this is over the gradient coordinates. The loss sum (the vector's last coordinate) is on
another scale: where its spread outweighed the gradients' it clipped honest members and refused
honest rounds (a review). It only reports the loss: when anyone is clipped, the step's is M
times the members' median loss per microbatch, which lies within the honest members' range.

A member's weight is w_i = sqrt(m_i), so that its pull on v, w_i min(|y_i - v|, r_i), is at
most R whatever count it claims (a member's count is its own claim: which microbatches reached
a replica is the routing's choice, and a replica's throughput claim steers the routing). Then
an honest majority out-pulls the rest, and rounds under attack are taken rather than refused.
Weighted by m_i, one claiming most of the step pulled by sqrt(m_b) R, clipped every honest
member and dragged v anywhere; weighted by min(m_i, median), hostile members each claiming the
largest honest count still did, against honest members with small counts (a review).

With fewer than three members there is no majority to trust: the sum is used, behind the
plausibility check in stepend. A member whose vector is not finite is left out, and the rest
stand in for its microbatches only if they hold a majority of the step's, or, three or more,
a majority of its members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

CLIP_FACTOR = 4.0  # honest members' normalised deviations are alike (high dimensions)
MIN_ROBUST = 3  # members: with fewer, no majority
ITERATIONS = 50
TOLERANCE = 1e-7  # relative change of v that ends the iteration
# a round is taken only if most members lie within FAR x R of the estimate: one of them is
# then honest (an honest majority), and the update near its mean. Over 1: v moves by up to
# about R under a hostile minority's pulls, and an attack should cost an outvoted update, not
# a refused round
FAR = 2.0


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
        counted = len(kept) + sum(1 for i in dropped if counts[i] > 0)
        outvoted = len(kept) >= MIN_ROBUST and 2 * len(kept) > counted
        if 2 * held <= microbatches and not outvoted:
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
    ys = xs / m[:, None]
    # the gradients alone: the loss sum (last) is on another scale, and where its spread
    # outweighed the gradients' it clipped honest members and refused honest rounds (a review)
    grads, losses = ys[:, :-1], ys[:, -1]
    v, clipped, radius = centered_clip(grads, m, m.sqrt())
    far = int(((grads - v).norm(dim=1) > FAR * radius).sum())
    if 2 * far >= len(kept):
        why = f"{far} of {len(kept)} members over {FAR:g}R from the estimate: no majority near"
        return Aggregate(None, [kept[j] for j in clipped], dropped, why, radius)
    if not clipped and not dropped:  # the exact sum
        return Aggregate(_sum([vectors[i] for i in kept]), [], dropped, radius=radius)
    loss = losses.median().reshape(1)  # within the honest members' range (a majority)
    total = (torch.cat([v, loss]) * microbatches).to(vectors[0].dtype)
    return Aggregate(total, [kept[j] for j in clipped], dropped, radius=radius)


def centered_clip(
    ys: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[int], float]:
    """The CenteredClip estimate of the rows `ys` (means over `counts` samples each, weighted
    by `weights`, by default `counts`), the rows it clipped at the fixed point, and R."""
    weights = counts if weights is None else weights
    center = ys.median(dim=0).values
    scale = counts.sqrt()
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
