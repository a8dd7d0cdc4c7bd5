"""The end of a step (a mixin of StageNode, see daemon.py): sum the stage's gradients with its
replicas through hivemind's averager, check the round covered every microbatch exactly once,
apply the update, log it, checkpoint; and the stage's state for replicas that join.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import torch

from node import checkpoint
from node import device as devices
from node.errors import NodeFailed

log = logging.getLogger(__name__)

ALONE_AFTER = 3  # failed averaging attempts before a replica holding every id applies alone


class Stepping:
    async def _finish_step(self) -> bool:
        """Average with the stage's replicas (if any) and apply the update; False when the
        replicas have not agreed yet (the caller handles messages, then tries again)."""
        L = self.ledger
        self.maybe_fail("round")
        members, group, round_s = [(self.node_id, self.mb_per_s)], 1, 0.0
        total, covered = None, sorted(L.counted)
        joiner = self.joiner_expected_at == self.step  # we just served our state to one
        wanted = self.membership.other_replicas() or not self._full() or joiner
        self._told_leaving = self.draining  # what this round (or our going alone) says
        give_up = self._full() and self._round_attempts >= ALONE_AFTER
        if self.averager is not None and wanted and not give_up:
            t0 = time.perf_counter()
            result = await self._round()
            round_s = time.perf_counter() - t0
            self.stats["round_s"] += round_s
            if result is None:
                self._round_attempts += 1
                # with every id of the step counted here, nobody else holds a share of it:
                # after a few empty attempts apply it alone (a replica that missed the round
                # sees it is behind and resyncs); otherwise keep trying, up to a limit
                if not (self._full() and self._round_attempts >= ALONE_AFTER):
                    return self._round_failed()
                log.info(
                    "stage %d: step %d: no replica came to the round: alone", self.k, self.step
                )
            else:
                total, members, group, covered = result
        self._round_fail_since, self._round_attempts = None, 0
        bootstrap = total is not None and total.numel() == 0
        loss = None
        if not bootstrap:
            if total is not None:
                self._load_grads(total)
                loss_sum = float(total[-1])
            else:
                loss_sum = L.loss_sum
            with self.state_lock:
                stats = await self._compute(self.runtime.step, self.step)
                self.step += 1
                self.stats["steps"] += 1  # resbm_steps_total (node/metrics.py)
            if self.is_last:
                loss = loss_sum / self.M
                self.last_loss = loss
            self._write_step_event(stats, loss, group, round_s, covered)
        if not self.synced:
            self.synced = True
            log.info("stage %d: in sync with the stage's replicas at step %d", self.k, self.step)
            await self.membership.announce()
        if self.averager is not None:
            self.averager.share_state(True)
        if self.is_first:
            self.group0 = sorted(members)
        self._begin_step()
        await self._maybe_checkpoint()
        return True

    def _full(self) -> bool:
        return self.ledger.counted == set(range(self.M))

    def _round_failed(self) -> bool:
        now = time.monotonic()
        self._round_fail_since = self._round_fail_since or now
        if now - self._round_fail_since > self.cfg.round_timeout_s:
            raise NodeFailed(
                f"step {self.step}: the replicas of stage {self.k} did not agree on the step's "
                f"microbatches within {self.cfg.round_timeout_s:.0f}s ({self._waiting_for()})"
            )
        return False

    async def _round(self):
        """One averaging attempt: (summed vector, stage-0 members, group size) or None."""
        L = self.ledger
        grads = torch.cat(  # on the host: hivemind averages CPU tensors
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                for p in self.params
            ]
        ).cpu()
        info = {
            "node": self.node_id,
            "step": self.step,
            "ids": sorted(L.counted),
            "synced": self.synced,
            "throughput": self.mb_per_s,
            "leaving": self.draining,
        }
        timeout = self.cfg.matchmaking_s * 3
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self.round_executor, self.averager.round, grads, L.loss_sum, info, timeout
        )
        self.stats["rounds"] += 1
        if result is None:
            return None
        verdict = check_round(result.members, self.step, self.M)
        if verdict == "behind":
            log.info(
                "stage %d: the stage's replicas are past step %d: resyncing", self.k, self.step
            )
            await self.membership.resync()
            return None
        members = [(m["node"], float(m["throughput"])) for m in result.members if not m["leaving"]]
        if verdict == "bootstrap":
            return torch.empty(0), members, len(result.members), []
        if verdict != "ok":
            log.info("stage %d: step %d: averaging round not valid: %s", self.k, self.step, verdict)
            return None
        covered = sorted(int(i) for m in result.members for i in m["ids"])
        return result.total, members, len(result.members), covered

    def _load_grads(self, total: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = total[offset : offset + n].view(p.shape).to(p.device, copy=True)
            offset += n

    def _write_step_event(self, stats, loss, group: int, round_s: float, covered) -> None:
        L, links = self.ledger, self.peers.links()
        event = {
            "stage": self.k,
            "node": self.node_id,
            "step": stats.step,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "counted": len(L.counted),
            "round_ids": list(covered),  # every id in the update applied: the whole step
            "recomputed": L.recomputed,
            "group": group,
            "round_s": round_s,
            "bytes_forward": sum(lk.bytes_sent["forward"] for lk in links),
            "bytes_backward": sum(lk.bytes_sent["backward"] for lk in links),
            "compute_s": self.compute_s,
            "codec_s": sum(lk.codec_seconds for lk in links),
            "transport_s": sum(lk.send_seconds for lk in links),
            "step_wall_s": time.perf_counter() - self._step_t0,
            "peak_memory_bytes": devices.peak_memory_bytes(self.runtime.device),
        }
        if loss is not None:
            event["loss"] = loss
            if L.counted:
                event["local_loss"] = L.loss_sum / len(L.counted)
        self.events.write("step", **event)

    async def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if self.cfg.checkpoint_dir and every and self.step % every == 0:
            with self.state_lock:
                await self._compute(
                    checkpoint.save_stage, self.cfg.checkpoint_dir, self.runtime, self.step
                )
            await self.membership.announce_checkpoint()

    # ---- state for joiners (called by hivemind in its own thread) -------------------------
    def _state_snapshot(self):
        with self.state_lock:
            if not self.synced:
                raise RuntimeError("not in sync: no state to share")
            tensors, meta = checkpoint.stage_state(self.runtime, self.step)
            self.joiner_expected_at = self.step  # it will come to this step's round
            names = sorted(tensors)
            return {"step": self.step, "names": names, "meta": meta}, [
                tensors[n].clone() for n in names
            ]

    def load_shared_state(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        with self.state_lock:
            state = dict(zip(meta["names"], tensors, strict=True))
            self.step = checkpoint.load_stage_state(self.runtime, state, meta["meta"])
            for p in self.params:
                p.grad = None
            self.runtime.pending.clear()


def check_round(members: list[dict], step: int, microbatches: int) -> str:
    """'ok', 'bootstrap' (stage 0 forming its first group), 'behind' (others are past our
    step), or why the round cannot be used."""
    try:  # what members all-gather is a peer's input: check every field
        if not members or not all(isinstance(m, dict) for m in members):
            return "a member sent malformed round info"
        steps = {m["step"] for m in members}
        ids = [i for m in members for i in m["ids"]]
        nodes = [m["node"] for m in members]
        synced = [m["synced"] for m in members]
        ok = (
            all(type(s) is int and s >= 0 for s in steps)
            and all(type(i) is int and 0 <= i < microbatches for i in ids)
            and all(isinstance(n, str) and 0 < len(n) <= 128 for n in nodes)
            and len(set(nodes)) == len(nodes)
            and all(type(s) is bool for s in synced)
            and all(type(m["leaving"]) is bool for m in members)
            and all(
                isinstance(m["throughput"], (int, float))
                and math.isfinite(m["throughput"])
                and m["throughput"] >= 0
                for m in members
            )
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        return "a member sent malformed round info"
    if max(steps) > step:
        return "behind"
    if steps != {step}:
        return f"members at steps {sorted(steps)}"
    if step == 0 and not ids and not any(synced):
        return "bootstrap"
    if len(ids) != len(set(ids)):
        return "a microbatch was counted twice"
    missing = set(range(microbatches)) - set(ids)
    if missing:
        return f"{len(missing)} microbatches not counted by this group: {sorted(missing)[:8]}"
    return "ok"
