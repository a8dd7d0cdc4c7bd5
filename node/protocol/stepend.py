"""The end of a step: sum the stage's gradients with its replicas (an Average effect, answered
by RoundDone), check the round covered every microbatch exactly once, apply the update, log it,
checkpoint. Loading a replica's state, and the state for joiners: syncing.py.
"""

from __future__ import annotations

import math
import time

import torch

from node import device as devices
from node.errors import NodeFailed
from node.protocol import robust
from node.protocol.core import Core, log
from node.protocol.events import Announce, Average, SaveCheckpoint, ShareState
from node.protocol.syncing import StateSync, split_naming
from node.swarm.records import NodeState

ALONE_AFTER = 3  # failed averaging attempts before a replica holding every id applies alone
# a round's sum may be at most this many times what the step's microbatches would give at our
# own gradient's norm per microbatch (members' sums are peers' input: #10 C1)
ROUND_NORM_FACTOR = 10.0


class StepEnd:
    def __init__(self, core: Core, averaging: bool, sync: StateSync):
        self.c, self.averaging, self.sync = core, averaging, sync
        self.begun: dict[str, list[int]] = {}  # stage 0: the next step's ids each member began

    # ---- the round -----------------------------------------------------------------------
    def finish(self) -> list | None:
        """Average with the stage's replicas (if any), or apply alone. Returns the early
        events now due when the step advanced; None when it waits for a round."""
        c, s = self.c, self.c.state
        c.trace("round")
        c.runtime.fold_early(s.step)  # overlapped: the step's gradient is on the parameters
        joiner = s.joiner_expected_at == s.step  # we just served our state to one
        others = c.view.other_replicas(s.node_id, s.step, s.dead)
        # and who averaged with us last time, even if our DHT view does not show it yet (a
        # joiner: found by the harness, the only other replica went on alone)
        others = others or len(s.round_peers - {s.node_id} - s.dead)
        wanted = others or not s.full() or joiner
        # what this round (or our going alone) says. Not while we hold the next step's work
        # begun early (overlapped): we do it in that step, and leave after its round
        s.told_leaving = s.draining and not s.holds_ahead()
        # stage 0, overlapped: the next step's ids we began (the next split leaves them ours)
        begun = sorted(s.ahead.share) if c.is_first and s.ahead is not None else []
        self.begun = {s.node_id: begun}  # what applying alone keeps
        give_up = s.full() and s.round_attempts >= ALONE_AFTER
        if self.averaging and wanted and not give_up:
            grads = torch.cat(  # on the host: hivemind averages CPU tensors
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                    for p in c.runtime.stage.parameters()
                ]
            ).cpu()
            info = {
                "node": s.node_id,
                "step": s.step,
                "ids": sorted(s.ledger.counted),
                "synced": s.synced,
                "throughput": s.mb_per_s,
                "leaving": s.told_leaving,
                "begun": begun,
                # stage 0's split of the step: what a replica that missed the bootstrap
                # round's result learns it from (see late_bootstrap)
                "group0": [list(m) for m in s.group0]
                if c.is_first and s.synced and s.group0
                else None,
            }
            s.waiting_for = "round"
            s.round_input = (float(grads.norm()), s.ledger.loss_sum, len(s.ledger.counted))
            c.effects.append(Average(grads, s.ledger.loss_sum, info, c.cfg.matchmaking_s * 3))
            return None
        return self.apply(None, [(s.node_id, s.mb_per_s)], 1, sorted(s.ledger.counted), 0.0)

    def on_round(self, result, round_s: float) -> list | None:
        """RoundDone: apply the summed update, or count a failed attempt (None)."""
        c, s = self.c, self.c.state
        s.waiting_for = None
        s.stats["rounds"] += 1
        s.stats["round_s"] += round_s
        if result is not None and (due := self.late_bootstrap(result.members)) is not None:
            return due
        got = None if result is None else self.check(result)
        if got == "resync":
            return None
        if got is None:
            s.round_attempts += 1
            self.last_of_the_stage()
            # with every id of the step counted here, nobody else holds a share of it:
            # after a few empty attempts apply it alone (a replica that missed the round
            # sees it is behind and resyncs); otherwise keep trying, up to a limit
            if not (s.full() and s.round_attempts >= ALONE_AFTER):
                self.round_failed()
                s.round_backoff = True
                return None
            log.info("stage %d: step %d: no replica came to the round: alone", c.k, s.step)
            return self.apply(None, [(s.node_id, s.mb_per_s)], 1, sorted(s.ledger.counted), round_s)
        total, members, group, covered = got
        return self.apply(total, members, group, covered, round_s)

    def last_of_the_stage(self) -> None:
        """Unsynced, with a replica's state of exactly this step loaded, and no replica of the
        stage is left online (the one we downloaded from was leaving): we hold the stage's
        state, so we are in sync; else nobody routes work here and the stage stalls (found by
        the harness)."""
        c, s = self.c, self.c.state
        if s.synced or s.loaded_step != s.step or s.ledger.counted or not c.view.dynamic:
            return
        if c.view.online_replicas(s.node_id, s.dead):
            return
        log.info("stage %d: the only replica left, with step %d's state: in sync", c.k, s.step)
        s.synced = True
        c.effects += [ShareState(True), Announce()]

    def late_bootstrap(self, members: list) -> list | None:
        """Stage 0's first round finished for the others and not for us (a round
        is not atomic): they split step 0 among a group with us in it, and wait for our share.
        At step 0 every replica holds the seeded weights, so we only need that split: take it
        from a synced member's round info, if it names us (found by the protocol harness)."""
        c, s = self.c, self.c.state
        if not c.is_first or s.synced or s.step != 0 or s.ledger.counted:
            return None
        for m in members:
            if not isinstance(m, dict) or m.get("synced") is not True or m.get("step") != 0:
                continue
            group = split_naming(m.get("group0"), s.node_id)
            if group is not None:
                log.info("stage %d: joining stage 0's split of step 0 from the round info", c.k)
                with c.lock:
                    s.synced, s.group0 = True, group
                    due = s.enter_step(0)
                c.effects += [ShareState(True), Announce()]
                return due
        return None

    def check(self, result):
        """(summed vector, stage-0 members, group size, ids covered), "resync", or None."""
        c, s = self.c, self.c.state
        verdict = check_round(result.members, s.step, c.M, c.schedule.overlap)
        if verdict == "behind":
            log.info("stage %d: the stage's replicas are past step %d: resyncing", c.k, s.step)
            self.sync.resync()
            return "resync"
        members = [(m["node"], float(m["throughput"])) for m in result.members if not m["leaving"]]
        if verdict == "bootstrap":
            names = {m["node"] for m in result.members}
            synced = c.view.online_replicas(s.node_id, s.dead) - names
            if synced:  # one of them is in sync already: its round info tells us its split
                log.info("stage %d: %s split step 0 already: not forming a new group", c.k,
                         ", ".join(sorted(synced)))  # fmt: skip
                s.split_by |= synced
                return None
            if s.split_by:  # it died: downstream may hold its microbatches of step 0. Wait
                # for their reports before dispatching (Recovery.hold_dispatch), so that its
                # adoption, not a second forward, completes them (found by the harness)
                s.split_by, s.hold_until, s.hold_for = set(), c.now + c.cfg.adopt_wait_s, None
            s.round_workers = {n for n, _ in members}  # the split's members: all will work
            self.begun = {}
            return torch.empty(0), members, len(result.members), []
        if verdict != "ok":
            log.info("stage %d: step %d: averaging round not valid: %s", c.k, s.step, verdict)
            return None
        names = [str(m["node"]) for m in result.members]
        if missing := sorted(self.expected() - set(names)):
            s.errors["round_split"] += 1
            s.split_since = s.split_since or c.now
            log.warning("stage %d: step %d: averaging round not valid: %s (replicas we "
                        "averaged with last, or in sync with us) not in it (the group's leader "
                        "may be splitting the stage)", c.k, s.step, ", ".join(missing))  # fmt: skip
            return None
        covered = sorted(int(i) for m in result.members for i in m["ids"])
        got = robust.aggregate(result.vectors, [len(m["ids"]) for m in result.members], c.M)
        if got.clipped or got.dropped:
            s.errors["outvoted"] += len(got.clipped) + len(got.dropped)
            log.warning("stage %d: step %d: clipped %s, left out %s (their vectors were far "
                        "from the others')", c.k, s.step, [names[i] for i in got.clipped],
                        [names[i] for i in got.dropped])  # fmt: skip
        problem = got.why if got.total is None else self.implausible(got.total)
        if problem:
            log.warning("stage %d: step %d: refused the round's sum (%s; members %s)",
                        c.k, s.step, problem, ", ".join(names))  # fmt: skip
            s.errors["bad_round"] += 1
            return None
        s.round_workers = {str(m["node"]) for m in result.members if m["ids"] and not m["leaving"]}
        self.begun = {str(m["node"]): list(m["begun"]) for m in result.members if m.get("begun")}
        return got.total, members, len(result.members), covered

    def expected(self) -> set[str]:
        """Who must be in a round we take (#10 C1): the replicas that counted microbatches in
        our last valid round, that the DHT lists online at our step (or one before: records lag
        a refresh) and that we do not presume dead. The group is whatever its leader shows each
        member: a hostile leader could show two honest replicas a group of two each, itself and
        one of them, each group's ids complete (it claims the other's), so that each applies a
        sum with its own vector in it, with no majority to outvote it, and they never compare
        digests. Honest replicas that averaged together must meet again. Not a replica that
        resyncs (its record says joining: it holds no ids, a leader gains nothing by leaving it
        out; waiting for it stalled the stage for its whole download, a review), nor one that
        only joined with nothing (a stranger could then stall us by keeping its record). With
        no such round behind us (our first: a joiner, a restart, a stage past 0 at step 0, or
        after applying alone), the replicas in sync with us: see in_sync. Only for half of
        `round_timeout_s` from the step's first refusal for a missing replica (`split_since`):
        a replica whose averaging never works (a volunteer's broken p2p) looks to us exactly
        like one a leader keeps apart from us, and waiting for it past round_timeout_s ended
        us (a review: at step 0 nobody was ahead for it to resync from, and the stage
        deadlocked). Timed from the step's first failed round of any kind, the patience ran
        out under rounds a member merely voided, and one split was then taken (a review). So
        the check stops a leader that cannot hold the stage apart for that long (it must lead
        the step's matchmaking at both ends of that time, and keep the rounds between failing),
        and costs a stage with such a replica that delay, not its nodes."""
        c, s = self.c, self.c.state
        if not c.view.dynamic:
            return set()
        if s.split_since is not None and c.now - s.split_since > c.cfg.round_timeout_s / 2:
            return set()
        recs, dead = c.view.stage(c.k), c.presumed_dead_set()
        if not s.round_workers:
            return self.in_sync(recs, dead)
        return {
            p
            for p in s.round_workers - {s.node_id} - dead
            if (r := recs.get(p)) is not None
            and r.state is not NodeState.draining
            # resyncing since that round (records lag: one from before it says joining too)
            and not (r.state is NodeState.joining and r.step >= s.step - 1 > 0)
        }

    def in_sync(self, recs: dict, dead: set[str]) -> set[str]:
        """The replicas whose sealed records say they are online at our step and vouch for
        the state we hold at it (the one we loaded, or vouch for ourselves): they hold our
        step's weights, so an honest one comes to this round, and a leader that split us
        from them in our first round kept us split for good (a review). Records lag a
        refresh: until theirs show our step, nobody is expected (as before), except at a
        fresh run's step 0, where every replica holds the seeded weights, and a record that
        vouches for nothing yet is one from before its first announcement. A stranger can copy
        an honest record's vouches and stay away (the stage then waits out the patience, see
        expected); a listed replica that takes work and never averages stalls every round
        anyway (docs/security.md)."""
        s = self.c.state
        ours = dict(s.vouches).get(s.step)
        if ours is None and s.loaded_step == s.step:
            ours = s.loaded_digest
        if ours is None:
            return set()
        fresh = s.step == 0 and s.loaded_step is None
        return {
            p
            for p, r in recs.items()
            if p != s.node_id
            and p not in dead
            and r.state is NodeState.online
            and r.step == s.step
            and (
                any(v.step == s.step and v.digest == ours for v in r.vouches)
                or (fresh and not r.vouches)
            )
        }

    def implausible(self, total) -> str | None:
        """Why the round's summed gradient cannot be the step's, or None. The members'
        vectors are peers' input, and robust.aggregate outvotes a minority only from three
        members on: refuse a sum that is not finite or is far larger than the step's
        microbatches would give at our own gradient's norm."""
        c, s = self.c, self.c.state
        if total is None or not bool(torch.isfinite(total).all()):
            return "not finite"
        norm, loss, counted = s.round_input
        if counted:  # the vector is the gradients, then the loss sum
            for what, ours, got in (("norm", norm, float(total[:-1].norm())),
                                    ("loss sum", loss, float(total[-1]))):  # fmt: skip
                bound = ROUND_NORM_FACTOR * c.M * ours / counted
                if not 0 <= got <= bound:
                    return f"{what} {got:.3g}, outside [0, {bound:.3g}]"
        return None

    def round_failed(self) -> None:
        c, s = self.c, self.c.state
        s.round_fail_since = s.round_fail_since or c.now
        if c.now - s.round_fail_since > c.cfg.round_timeout_s:
            raise NodeFailed(
                f"step {s.step}: the replicas of stage {c.k} did not agree on the step's "
                f"microbatches within {c.cfg.round_timeout_s:.0f}s"
            )

    # ---- the update ----------------------------------------------------------------------
    def apply(self, total, members, group: int, covered, round_s: float) -> list:
        c, s = self.c, self.c.state
        s.round_fail_since, s.round_attempts = None, 0  # split_since: enter_step
        s.round_peers = {n for n, _ in members} if total is not None else set()
        if total is None:  # alone: nobody to meet again (check() sets it for a valid round)
            s.round_workers = set()
        bootstrap = total is not None and total.numel() == 0
        with c.lock:  # a joiner's state download sees the weights and the step together
            step = s.step
            if c.is_first:  # the next step's split: before the digest, which covers it
                s.group0 = sorted(members)
                s.begun0 = {} if bootstrap else dict(self.begun)
            digest = None  # computed below, or by vouch() (bootstrap)
            if not bootstrap:
                if total is not None:
                    self.load_grads(total)
                    loss_sum = float(total[-1])
                else:
                    loss_sum = s.ledger.loss_sum
                stats = c.compute(c.runtime.step, s.step)
                s.stats["steps"] += 1  # resbm_steps_total (node/metrics.py)
                loss = None
                if c.is_last:
                    loss = loss_sum / c.M
                    s.last_loss = loss
                step += 1
                digest = c.compute(self.sync.digest, step) if self.averaging else None
                self.step_event(stats, loss, group, round_s, covered, digest)
            if not s.synced:
                s.synced = True
                log.info("stage %d: in sync with the stage's replicas at step %d", c.k, step)
                c.effects.append(Announce())
            if self.averaging:
                c.effects.append(ShareState(True))
            # draining, and the stage's replicas know (stage 0: we are out of the split): the
            # next step is not ours; the machine lingers for the stage, then leaves
            s.drained = s.draining and s.told_leaving
            due = s.enter_step(step)
            # after the bootstrap round too: stage 0's split is in the digest (#10 C2)
            self.sync.vouch(digest)
            if s.hold_next and not bootstrap:  # we adopted a dead stage-0 replica's part
                s.hold_until, s.hold_next = c.now + c.cfg.adopt_wait_s, False
        every = c.cfg.checkpoint_every
        if c.cfg.checkpoint_dir and every and s.step % every == 0 and not bootstrap:
            c.effects.append(SaveCheckpoint(s.step))
        return due

    def load_grads(self, total: torch.Tensor) -> None:
        offset = 0
        for p in self.c.runtime.stage.parameters():
            n = p.numel()
            p.grad = total[offset : offset + n].view(p.shape).to(p.device, copy=True)
            offset += n

    def step_event(self, stats, loss, group: int, round_s: float, covered, digest) -> None:
        """The `step` line of the event log; the daemon adds the links' byte and time counters."""
        c, s = self.c, self.c.state
        L = s.ledger
        event = {
            "stage": c.k,
            "node": s.node_id,
            "step": stats.step,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "counted": len(L.counted),
            "round_ids": list(covered),  # every id in the update applied: the whole step
            "recomputed": L.recomputed,
            "begun_early": L.begun_early,  # overlapped: the forwards that did not wait for us
            "window": s.window_size,  # stage 0: microbatches it let be in flight (window.py)
            "round_trip_s": s.window.round_trip_s,  # ...and the least round trip measured
            "group": group,
            "round_s": round_s,
            "compute_s": s.compute_s,
            "step_wall_s": time.perf_counter() - s.step_t0,
            "peak_memory_bytes": devices.peak_memory_bytes(c.runtime.device),
        }
        if digest is not None:  # of the state after this update: replicas' are equal
            event["state_digest"] = digest
        if loss is not None:
            event["loss"] = loss
            if L.counted:
                event["local_loss"] = L.loss_sum / len(L.counted)
        c.emit("step", **event)


def check_round(members: list[dict], step: int, microbatches: int, overlap: int = 0) -> str:
    """'ok', 'bootstrap' (stage 0 forming its first group), 'behind' (others are past our
    step), or why the round cannot be used. `overlap` (the overlapped schedule): each member's
    `begun`, the next step's ids it began (stage 0), are below it, disjoint, and none is a
    leaving member's (it stays for them)."""
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
            and all(isinstance(m.get("begun", []), list) for m in members)
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
    begun = [i for m in members for i in m.get("begun", [])]
    if not all(type(i) is int and 0 <= i < overlap for i in begun) or len(begun) != len(set(begun)):
        return "a member sent malformed round info (its early ids)"
    if any(m["leaving"] and m.get("begun") for m in members):
        return "a leaving member began the next step"
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
