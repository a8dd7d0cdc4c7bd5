"""Whom a joiner downloads its stage's state from, and whether it takes what came (#10 C2).

hivemind's state sharing asked whichever peer declared the highest priority in the DHT, and took
what it sent: a stranger declaring the top priority served every joiner of the stage. Now:

- every synced replica vouches, in its sealed DHT record, for the state it held at the start of
  each of its last steps (records.Vouch: the step and checkpoint.state_digest of that state);
- a joiner collects those vouches while it downloads (`Vouches`: a download spans several steps,
  and a record shows only the last few), asks only replicas that vouch, the state most of them
  vouch for first, and recomputes the digest from the bytes that came;
- it takes the state only if at least `need` replicas other than itself vouch for that digest at
  that step: two wherever two or more replicas vouch at all, else the one there is. A state
  that another digest has `need` vouches for at the same step is refused at once; one nobody
  vouches for yet is waited on (records lag by a refresh) for a bounded time, then refused.

Replicas hold the same bits (they add the same vectors in the same order: robust.py), so honest
replicas vouch for one digest. What this does not stop: two keys of one stranger vouching for a
poisoned state (Sybil), and a stage whose only other replica is hostile. Pure: no I/O; the driver
(node/membership.py) reads the records and downloads.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from node import checkpoint
from node.swarm.records import NodeRecord

OK, WAIT = "ok", "wait"
MAX_NODES = 256  # vouchers a joiner keeps track of (a stranger's keys cannot grow it)
MAX_PER_NODE = 64  # the newest steps kept of each: a download spans many steps


@dataclass(frozen=True)
class Donor:
    node: str
    averager: str  # hivemind peer id (base58) of its averager


@dataclass
class Vouches:
    """What the stage's records vouched for, collected over a download: (node, step) -> digest,
    and where each node's averager is."""

    me: str
    by_node: dict[str, dict[int, str]] = field(default_factory=dict)  # node -> step -> digest
    averagers: dict[str, str] = field(default_factory=dict)

    def add(self, records: dict[str, NodeRecord]) -> None:
        for node, rec in records.items():
            if node == self.me or rec.averager is None or not rec.vouches:
                continue
            if node not in self.averagers and len(self.averagers) >= MAX_NODES:
                continue  # a flood of fresh keys: the ones seen first are kept
            self.averagers[node] = rec.averager
            steps = self.by_node.setdefault(node, {})
            steps.update((v.step, v.digest) for v in rec.vouches)
            for step in sorted(steps)[:-MAX_PER_NODE]:  # its newest only: one key cannot
                del steps[step]  # fill this

    @property
    def seen(self) -> dict[tuple[str, int], str]:
        """(node, step) -> digest, every vouch kept."""
        return {(n, t): d for n, steps in self.by_node.items() for t, d in steps.items()}

    def vouchers(self) -> set[str]:
        return {node for node, steps in self.by_node.items() if steps}

    def need(self) -> int:
        """Vouches a state needs: two where two or more replicas vouch, else one."""
        return min(2, len(self.vouchers()))

    def donors(self, rng: random.Random | None = None) -> list[Donor]:
        """Every voucher, those whose newest state most others also vouch for first, then the
        newest step; random among equals (no one is asked first by every joiner)."""
        rng = rng or random.Random()
        newest = {n: max(steps.items()) for n, steps in self.by_node.items() if steps}
        tally = Counter(item for steps in self.by_node.values() for item in steps.items())
        order = sorted(newest, key=lambda n: (-tally[newest[n]], -newest[n][0], rng.random()))
        return [Donor(n, self.averagers[n]) for n in order]

    def verdict(self, step: int, digest: str) -> str:
        """OK, WAIT (not vouched for enough yet: records lag), or why the state is refused."""
        need = self.need()
        if need == 0:
            return WAIT
        at_step = Counter(steps[step] for steps in self.by_node.values() if step in steps)
        if at_step[digest] >= need:
            return OK
        if any(n >= need for d, n in at_step.items() if d != digest):
            return f"replicas vouch for another state at step {step}"
        return WAIT


def snapshot_digest(meta: dict, tensors: list[torch.Tensor]) -> tuple[int, str]:
    """(step, digest) of a downloaded snapshot (the form StateSync.snapshot serves). Raises
    ValueError on a malformed one (a peer's input)."""
    try:
        inner, names = meta["meta"], meta["names"]
        step = int(meta["step"])
        if step != int(inner["step"]):
            raise ValueError(f"a state at step {meta['step']} says step {inner['step']} inside")
        if len(names) != len(tensors) or len(set(names)) != len(names):
            raise ValueError("a state whose names do not match its tensors")
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ValueError("a state with something other than tensors")
        group0 = meta.get("group0")  # stage 0's split: covered too (#10 C2)
        begun0 = meta.get("begun0")
        state = dict(zip(names, tensors, strict=True))
        digest = checkpoint.state_digest(state, inner, group0, begun0)
        return step, digest
    except (KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ValueError(f"a malformed state ({type(err).__name__}: {err})") from None
