"""What one node did in one step, per microbatch id: enough to finish the step, to prove it was
counted exactly once, and to replay this node's part if a neighbour dies (#4's recovery).

The boundary tensors kept here are small by design (b = d/128 channels), which is what makes
keeping every microbatch's z and dL/dz until the step's flush cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from node.wire.messages import Forward


@dataclass
class StepLedger:
    step: int
    came_from: dict[int, str] = field(default_factory=dict)  # id -> upstream node
    sent_to: dict[int, str] = field(default_factory=dict)  # id -> downstream node
    z_in: dict[int, Forward] = field(default_factory=dict)  # the forwards we received
    z_out: dict[int, Forward] = field(default_factory=dict)  # the forwards we sent
    grad_out: dict[int, torch.Tensor] = field(default_factory=dict)  # dL/dz we received
    grad_in: dict[int, torch.Tensor] = field(default_factory=dict)  # dL/dz we sent upstream
    counted: set[int] = field(default_factory=set)  # in this node's gradient sum
    no_grad_back: set[int] = field(default_factory=set)  # upstream has our dL/dz already
    loss_sum: float = 0.0  # last stage: sum of the counted microbatches' losses
    done_from: dict[str, set[int]] = field(default_factory=dict)  # STEP_DONE ids per upstream
    done_sent: set[int] = field(default_factory=set)  # the ids of our last STEP_DONE
    done_told: set[str] = field(default_factory=set)  # downstream peers that have heard it
    fwd_from: dict[str, set[int]] = field(default_factory=dict)  # FORWARDED ids per upstream
    fwd_sent: set[int] = field(default_factory=set)  # the ids of our last FORWARDED
    fwd_told: set[str] = field(default_factory=set)  # downstream peers that have heard it
    recomputed: int = 0  # microbatches recomputed for a dead replica (ours or adopted)
    share: list[int] = field(default_factory=list)  # stage 0: the ids this replica dispatches
    split: dict[str, list[int]] = field(default_factory=dict)  # stage 0: every replica's share
    queue: list[int] = field(default_factory=list)  # stage 0: not yet dispatched
    stalled: list[int] = field(default_factory=list)  # forwards waiting for a downstream replica
    unavailable: dict[str, float] = field(default_factory=dict)  # refused a forward: when
    replayed: set[int] = field(default_factory=set)  # forwards re-sent to an adopter
    redone: dict[int, str] = field(default_factory=dict)  # a finished step's forwards redone
    # for a dead replica of ours (protocol/redo.py): id -> the downstream node sent to
    taken: dict[int, str] = field(default_factory=dict)  # stage 0: ids of our share another
    # stage-0 replica sent first, as the downstream node named says (protocol/disputes.py)
    begun_early: int = 0  # overlapped: forwards run here while the step before was open

    def outstanding(self) -> dict[str, int]:
        """Microbatches sent to each downstream node whose gradient has not come back."""
        out: dict[str, int] = {}
        for i, peer in self.sent_to.items():
            if i not in self.grad_out:
                out[peer] = out.get(peer, 0) + 1
        return out

    def upstream_done(self) -> set[int]:
        """The ids whose gradients the upstream stage holds (its replicas' STEP_DONEs)."""
        return set().union(*self.done_from.values()) if self.done_from else set()

    def upstream_forwarded(self) -> set[int]:
        """The ids the upstream stage has passed on to ours (FORWARDED; a STEP_DONE says
        that too: a replica holds the gradient only of what it forwarded)."""
        return self.upstream_done().union(*self.fwd_from.values())
