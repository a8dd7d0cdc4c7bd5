"""Replicas of a stage sum their gradients, and joiners download a stage's state, through
hivemind's DecentralizedAverager (its all-reduce, its matchmaking, its state sharing).

The averager runs in a child process that hivemind forks, on a shared-memory buffer: create this
before any torch compute or gRPC object in the process. Its buffer is the stage's gradients as one
flat fp32 vector plus the loss sum; every replica joins every round with weight 1 (a replica that
processed nothing sends zeros), so mean x group size = the exact sum. Each round all-gathers which
microbatch ids every member counted: a round is valid only if those are disjoint and cover the
whole step, so a replica that missed the round (or a stale member) is caught, never averaged in.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager

log = logging.getLogger(__name__)

StateFn = Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]
STRIDE = 1024  # values per check element: every reducer's span of the vector holds some


class _Averager(DecentralizedAverager):
    """hivemind calls get_current_state in our process when a joiner asks for our state."""

    def __init__(self, *args, **kwargs):
        self.state_fn: StateFn | None = None
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        fn = self.state_fn
        if fn is None:
            return {"ready": False}, [], None
        meta, tensors = fn()
        return {"ready": True, **meta}, tensors, None


@dataclass(frozen=True)
class Round:
    """One successful all-reduce: the summed vector and what every member said about itself."""

    total: torch.Tensor  # sum over the group of the members' vectors
    members: list[dict[str, Any]]


class StageAverager:
    def __init__(
        self,
        dht,
        prefix: str,
        numel: int,
        target_group_size: int | None,
        matchmaking_s: float = 1.0,
        allreduce_timeout_s: float = 60.0,
    ):
        self.numel = numel
        self._lock = threading.Lock()
        # (rows, STRIDE + 1): gradients then the loss sum, row-major, with a check column
        self.rows = -(-(numel + 1) // STRIDE)
        from node.swarm.dht import forking

        with forking():  # it forks too: see there
            self.averager = _Averager(
                [torch.zeros(self.rows, STRIDE + 1)],
                dht,
                start=True,
                prefix=prefix,
                target_group_size=target_group_size,
                min_group_size=2,
                min_matchmaking_time=matchmaking_s,
                request_timeout=max(matchmaking_s / 2, 0.2),
                allreduce_timeout=allreduce_timeout_s,
                # no per-chunk timeout: with one, hivemind drops a slow member's part from some
                # reducers and members end up with *different* sums; without, a round with a slow
                # or dead member fails as a whole (after allreduce_timeout) and is retried
                next_chunk_timeout=None,
                allow_state_sharing=False,
                declare_state_period=5.0,
            )

    def set_state_provider(self, fn: StateFn) -> None:
        self.averager.state_fn = fn

    def share_state(self, allow: bool) -> None:
        """Offer our state to joiners. A client-mode averager (behind NAT) cannot be reached:
        joiners download from a reachable replica instead."""
        if not self.averager.client_mode:
            self.averager.allow_state_sharing = allow

    def round(
        self, grads: torch.Tensor, loss_sum: float, info: dict[str, Any], timeout_s: float
    ) -> Round | None:
        """Blocking (run it off the event loop). None when no group formed in time."""
        nonce = 1.0 + random.random()  # this member's check value, all-gathered with its info
        info = {**info, "nonce": nonce}
        with self._lock:
            data = torch.zeros(self.rows * STRIDE)
            data[: self.numel].copy_(grads)
            data[self.numel] = loss_sum
            with self.averager.get_tensors() as (buf,):
                buf[:, :STRIDE].copy_(data.view(self.rows, STRIDE))
                buf[:, STRIDE] = nonce
            try:
                gathered = self.averager.step(
                    gather=info, weight=1.0, timeout=timeout_s, allow_retries=False
                )
            except Exception as err:  # hivemind raises on a failed group; that is "no round"
                log.info("averaging round failed: %s", err)
                return None
            if not gathered:
                return None
            with self.averager.get_tensors() as (buf,):
                result = buf.clone()
            members = list(gathered.values())  # check_round vets every member
            if not self._complete(result[:, STRIDE], members):
                return None
            total = result[:, :STRIDE].reshape(-1)[: self.numel + 1] * len(gathered)
            return Round(total, members)

    @staticmethod
    def _complete(check: torch.Tensor, members: list) -> bool:
        """hivemind may finish a round with a part missing: a reducer that lost a sender averages
        the rest, a member that lost a reducer keeps its own values for that part ("received
        X% results"), and members end up with different sums. Every row carries a check column
        where each member put its own nonce: each must come out as the mean of all nonces."""
        try:
            nonces = [float(m["nonce"]) for m in members]
        except (KeyError, TypeError, ValueError):
            return False
        expected = sum(nonces) / len(nonces)
        if not torch.allclose(check, torch.full_like(check, expected), rtol=0, atol=1e-5):
            bad = int((check - expected).abs().gt(1e-5).sum())
            log.warning("averaging round incomplete (%d of %d parts): not used", bad, len(check))
            return False
        return True

    def load_state(self, timeout_s: float) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        """A replica's state (blocking), or None if no replica shared one in time."""
        try:
            got = self.averager.load_state_from_peers(timeout=timeout_s)
        except Exception as err:
            log.info("state download failed: %s", err)
            return None
        if not got:
            return None
        meta, tensors = got
        if not isinstance(meta, dict) or not meta.get("ready"):
            return None
        return meta, list(tensors)

    def shutdown(self) -> None:
        try:
            self.averager.shutdown()
        except Exception as err:
            log.debug("averager shutdown: %s", err)
