"""Who processes which microbatch: pure functions, shared by every replica so that all of them
compute the same answer from the same inputs (no coordinator on the data path)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MAX_THROUGHPUT = 1e9  # microbatches/s: far above any hardware
MAX_RATIO = 64.0  # the fastest replica's share over the slowest's, at most (a GPU and a CPU)


def split_share(
    members: Sequence[tuple[str, float]],
    microbatches: int,
    begun: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """Stage 0's microbatch ids of one step, split among its replicas in proportion to their
    measured throughput (largest remainder; ties by node id). Every stage-0 replica holds the same
    `members` (all-gathered in the previous averaging round), so they split identically and each
    id is dispatched exactly once. `begun` (the overlapped schedule): the ids each member began
    before the round (also all-gathered, disjoint: stepend.check_round) stay that member's; the
    others are split."""
    merged = dict(members)  # one entry per node, whatever a peer sent
    taken: dict[int, str] = {}  # each id once, within the step, whatever a peer sent
    for n in sorted(n for n in (begun or {}) if n in merged):
        for i in begun[n]:
            if type(i) is int and 0 <= i < microbatches:
                taken.setdefault(i, n)
    begun = {n: [i for i, o in sorted(taken.items()) if o == n] for n in merged}
    ids = [i for i in range(microbatches) if i not in taken]
    # a peer's claim is bounded: no overflow (two claims of 1e308 summed to inf and crashed
    # every stage-0 replica: #10 C1), and no replica gets more than MAX_RATIO x the slowest's
    # share, whatever it claims
    known = [min(t, MAX_THROUGHPUT) for t in merged.values() if math.isfinite(t) and t > 0]
    default = sum(known) / len(known) if known else 1.0  # a replica not measured yet: average
    cap = MAX_RATIO * min(known) if known else 1.0
    members = sorted(
        (n, min(t if math.isfinite(t) and t > 0 else default, cap)) for n, t in merged.items()
    )
    if not members:
        return {}
    weights = [t for _, t in members]
    total = sum(weights)
    quotas = [microbatches * w / total for w in weights]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(members)), key=lambda i: (-(quotas[i] - counts[i]), members[i][0]))
    for i in order[: microbatches - sum(counts)]:
        counts[i] += 1
    # what a member began counts towards its share; the rest of its quota comes from `ids`
    counts = [max(0, c - len(begun[n])) for c, (n, _) in zip(counts, members, strict=True)]
    while sum(counts) > len(ids):  # some began more than their quota: the others take fewer
        counts[max(order, key=lambda i: counts[i])] -= 1
    for i in order[: len(ids) - sum(counts)]:
        counts[i] += 1
    # interleave rather than cut in blocks, so every replica starts working at once
    names = [m for m, _ in members]
    remaining = dict(zip(names, counts, strict=True))
    out: dict[str, list[int]] = {m: list(begun[m]) for m in names}
    turn = 0
    for i in ids:
        while remaining[names[turn % len(names)]] == 0:
            turn += 1
        node = names[turn % len(names)]
        out[node].append(i)
        remaining[node] -= 1
        turn += 1
    return {m: sorted(share) for m, share in out.items()}


def pick_replica(load: Mapping[str, int], throughput: Mapping[str, float]) -> str | None:
    """The replica to send the next microbatch to: least outstanding work per unit of measured
    throughput, so a replica twice as fast gets about twice the microbatches. Ties by node id.
    A replica not measured yet (just joined) counts as an average one, so it gets work and a
    measurement, rather than starving behind the measured ones."""
    if not load:
        return None
    known = [throughput[p] for p in load if throughput.get(p, 0) > 0]
    default = sum(known) / len(known) if known else 1.0
    speed = {p: throughput[p] if throughput.get(p, 0) > 0 else default for p in load}
    return min(load, key=lambda p: ((load[p] + 1) / max(speed[p], 1e-9), p))
