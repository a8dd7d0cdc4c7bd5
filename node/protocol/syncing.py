"""A replica's state: loading one downloaded from a replica (a Resync effect, answered by
StateLoaded), vouching for the one we hold, and serving it to joiners. A downloaded state is a
peer's input: Membership.download took it only if replicas vouch for its digest
(node/protocol/vouching.py), and it is vetted again here, before and after it is loaded (#10 C2).
"""

from __future__ import annotations

import math

import torch

from node import checkpoint
from node.protocol.core import Core, log
from node.protocol.events import Announce, Resync, ShareState
from node.swarm.records import MAX_VOUCHES
from node.wire.messages import printable, step_of

SYNC_ATTEMPTS = 5  # unusable states downloaded before a resync gives up (and waits)


OURS = object()  # digest(): stage 0's split as this node holds it


class StateSync:
    def __init__(self, core: Core, averaging: bool):
        self.c, self.averaging = core, averaging
        self.resync_attempts = 0

    # ---- resync: load a replica's state ----------------------------------------------------
    def resync(self) -> None:
        c, s = self.c, self.c.state
        if s.waiting_for == "resync":
            return
        s.was_synced, s.synced = s.synced, False
        if not self.averaging:
            return
        s.waiting_for = "resync"
        c.effects += [ShareState(False), Announce(), Resync()]

    def on_state(self, meta: dict | None, tensors: list | None, retry: bool = True) -> list | None:
        """StateLoaded: take the downloaded state (the next averaging round syncs us); an
        unusable one is asked for again (`retry`), up to SYNC_ATTEMPTS times."""
        c, s = self.c, self.c.state
        s.waiting_for = None
        if meta is None:  # nobody shared one
            self.resync_attempts = 0
            if s.was_synced:  # we loaded nothing: our weights are still our step's (found by
                s.synced = True  # the harness: the only replica ahead had died with its state,
                c.effects += [ShareState(True), Announce()]  # and we could not adopt its part)
                s.behind_since = c.now  # and try again only after BEHIND_IDLE_S
            return None  # else unsynced: we join the next round with nothing
        try:
            state = dict(zip(meta["names"], tensors, strict=True))
            self.vet_state(state, meta["meta"])
            with c.lock:
                # overlapped: the early version of the step we load, as we cut it (with the
                # gradients of the microbatches we began early in it)
                mine = c.runtime.early.get(int(meta["meta"]["step"]))
                step = checkpoint.load_stage_state(c.runtime, state, meta["meta"])
                # what we now hold must be what replicas vouched for (Membership.download
                # checked the bytes; a donor's parameter ids could still differ: review)
                vouched = meta.get("vouched")
                group0 = meta.get("group0") if c.is_first else None
                begun0 = meta.get("begun0") if c.is_first else None
                if vouched is not None and c.compute(self.digest, step, group0, begun0) != vouched:
                    raise ValueError("the state loaded is not the one replicas vouch for")
                for p in c.runtime.stage.parameters():
                    p.grad = None
                # the step's early work we did is still good if we cut the same version: we
                # held the same state as the replicas before the round we missed (then the
                # split, begun0, leaves it ours); else it is void
                kept = mine is not None and c.runtime.keep_early(step, mine)
                for mid in list(c.runtime.pending):
                    if not (kept and mid.step == step and c.runtime.is_early(mid)):
                        del c.runtime.pending[mid]
                if not kept or (s.ahead is not None and s.ahead.step != step):
                    s.ahead = None
        except Exception as err:  # a peer's input, whatever is wrong with it (#10 C2)
            s.errors["bad_state"] += 1
            log.warning("stage %d: a replica sent an unusable state: %s", c.k, printable(str(err)))
            self.resync_attempts += 1
            if retry and self.resync_attempts < SYNC_ATTEMPTS:
                s.waiting_for = "resync"
                c.effects.append(Resync())
            return None
        self.resync_attempts = 0
        s.loaded_step, s.vouches = step, []  # we vouch again after our first round's update
        s.loaded_digest = vouched
        # work of the step we loaded (or later) that was routed to us is ours to do: we hold
        # the stage's weights of exactly that step (older messages are void)
        # (overlapped: up to position.reach steps ahead, as far as `keep` reaches; found by
        # the harness: a resync at step 2 dropped step 4's forwards, begun early upstream)
        s.keep_early(lambda ev: step <= step_of(ev.msg) <= step + s.keep)
        s.round_fail_since, s.round_attempts = None, 0  # that step is over
        if any(step_of(ev.msg) == step for ev in s.early) or s.holds_ahead():
            s.synced = True
            c.effects.append(ShareState(True))
        group = split_naming(meta.get("group0"), s.node_id) if c.is_first else None
        if group is not None:
            # stage 0: the replicas split this step among a group with us in it (we missed
            # the last round's result, say): our share of it is ours to do (found by the
            # harness: nobody dispatched it, and the stage's rounds never covered the step)
            s.synced, s.group0 = True, group
            s.begun0 = begun_naming(meta.get("begun0"), group, c.schedule.overlap)
            c.effects.append(ShareState(True))
        with c.lock:
            due = s.enter_step(step)
        c.effects.append(Announce())  # joining, at the step we loaded: replicas expect us
        c.emit("synced", stage=c.k, node=s.node_id, step=step)
        log.info("stage %d: downloaded the stage's state at step %d", c.k, step)
        return due

    def vet_state(self, state: dict, meta: dict) -> None:
        """A downloaded state is a peer's input: refuse non-finite tensors and a step outside
        the run (a donor could send NaN weights, or a far step: #10 C2). Raises ValueError.
        (Bounding the step by the replicas' DHT records refused honest states in fast swarms,
        whose records lag by seconds; a step that a round agrees on needs signed records.)"""
        step = int(meta["step"])
        if not 0 <= step <= self.c.cfg.steps:
            raise ValueError(f"a state at step {step}, outside the run's 0..{self.c.cfg.steps}")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} is not a tensor")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} is not finite")

    # ---- state for joiners (called by hivemind in its own thread) -------------------------
    def vouch(self, digest: str | None = None) -> None:
        """A synced replica vouches for the state it holds at the start of its step (`digest`,
        if known), at start and after each update: what joiners check a download against
        (vouching.py, #10 C2)."""
        c, s = self.c, self.c.state
        if self.averaging and s.synced:
            digest = digest or c.compute(self.digest, s.step)
            kept = [(t, d) for t, d in s.vouches if t != s.step]  # a bootstrap split: again
            s.vouches = [*kept, (s.step, digest)][-MAX_VOUCHES:]

    def digest(self, step: int, group0=OURS, begun0=None) -> str:
        """The digest of the state we would serve at `step` (checkpoint.state_digest), with
        stage 0's split (ours, or `group0` and `begun0`: a download's)."""
        c = self.c
        tensors, meta = checkpoint.stage_state(c.runtime, step)
        if group0 is OURS:
            group0, begun0 = c.state.group0, c.state.begun0
        if not c.is_first:
            group0 = begun0 = None
        return checkpoint.state_digest(tensors, meta, group0, begun0)

    def snapshot(self):
        c, s = self.c, self.c.state
        with c.lock:
            if not s.synced:
                raise RuntimeError("not in sync: no state to share")
            tensors, meta = checkpoint.stage_state(c.runtime, s.step)
            # it will come to this step's round, and gets as many attempts as anyone: the ones
            # that failed before it came do not count (found by the harness: a replica that had
            # failed alone for seconds, its adoption then done, applied alone at once and left
            # its joiner behind). Once a step: a peer downloading again and again (anyone may)
            # must not keep a replica from ever applying alone (a review)
            if s.joiner_expected_at != s.step:
                s.round_attempts = 0
            s.joiner_expected_at = s.step
            names = sorted(tensors)
            split = [list(m) for m in s.group0] if c.is_first and s.group0 else None
            begun = {n: list(ids) for n, ids in s.begun0.items()} if split else None
            out = {"step": s.step, "names": names, "meta": meta, "group0": split}
            if begun:  # overlapped: who began which ids of this step (the split keeps them)
                out["begun0"] = begun
            return out, [tensors[n].clone() for n in names]


def split_naming(group0, node_id: str) -> list[tuple[str, float]] | None:
    """Stage 0's split of a step, as a peer sent it (round info, a state download): the
    (node, throughput) pairs, sorted, if well formed and naming `node_id`; else None."""
    try:
        group = sorted((str(n), float(t)) for n, t in group0 or [])
    except (TypeError, ValueError):
        return None
    ok = len(group) <= 1024 and all(math.isfinite(t) and t >= 0 for _, t in group)
    # a split naming us alone is legitimate (a draining replica's last split leaves us the
    # step), and outside the state digest (checkpoint.state_digest): open, docs/security.md
    return group if ok and node_id in {n for n, _ in group} else None


def begun_naming(begun0, group: list[tuple[str, float]], overlap: int) -> dict[str, list[int]]:
    """The ids of a step each member of stage 0's split began early, as a download says (a
    peer's input, covered by the digest replicas vouch for): well formed, or none."""
    try:
        names = {n for n, _ in group}
        out = {str(n): sorted({int(i) for i in ids}) for n, ids in (begun0 or {}).items()}
        ids = [i for v in out.values() for i in v]
        if set(out) <= names and len(ids) == len(set(ids)) and all(0 <= i < overlap for i in ids):
            return out
    except (TypeError, ValueError, AttributeError):
        pass
    return {}
