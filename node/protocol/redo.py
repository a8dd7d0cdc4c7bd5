"""Exact recovery after the update: a dead replica's part of a step our stage has applied.

Its microbatches were counted in that step's round, so nothing is added to any update here.
What can still be missing is a z it sent to a downstream replica that died too, whose adopter
is still in that step and cannot finish it without that z (two deaths in a row: harness seeds
5 and 378 of the overlapped schedule). Nobody holds it any more, and our current weights would
give another one: we compute it again at the weights the step ran it at (the stage keeps the
last finished step's: StageRuntime.forward_past), bit for bit. Only the step before ours
(`Adopter.redoes`): a neighbour further behind than that is resynced, not helped.
"""

from __future__ import annotations

from node.data import Microbatch, MicrobatchId
from node.protocol.core import Core, log
from node.protocol.flow import DataFlow
from node.protocol.state import Adoption
from node.wire.messages import Backward, Forward


class PastRedo:
    def __init__(self, core: Core, flow: DataFlow):
        self.c, self.flow = core, flow

    def adopt(self, a: Adoption) -> None:
        """Once the dead replica's neighbours have reported (Adopter.ready): upstream re-sent
        the z it had sent it (stage 0: its share, from the step's split), and a live
        downstream replica that holds one of its z said so (a claim). The others never
        reached a live replica: run them again and send them, as a redone forward
        (`grad_needed` False on a plain forward), to the one replica that adopts a dead
        downstream replica (the one every neighbour picks: Recovery.adopter), and which takes
        it only as such (`takes_redone`): one taker, so it is counted once (a review: routed
        by load, a third replica of that stage counted it as new work). With two downstream
        replicas dead, the first one's adopter takes them all: still once. Not when every
        downstream record is past the step (their rounds covered every id), not for our own
        id (a flap: upstream re-sent what we hold; our update waited for its STEP_DONE, so it
        needs no gradient), nor for a death only a neighbour's word vouches for."""
        c, s = self.c, self.c.state
        if not a.confirmed:
            return  # until no View lists it (Adopter.process_adoptions confirms it)
        a.done = True
        if a.dead == s.node_id or c.is_last:
            return
        L = next(L for L in s.kept() if L.step == a.step)
        if not any(rec.step <= a.step for rec in c.view.stage(c.k + 1).values()):
            return
        ids = set(L.split.get(a.dead, ())) if c.is_first else set(a.forwards)  # stage 0: its share
        redo = sorted(i for i in ids if i not in a.claims and i not in L.z_out | L.redone)
        # one taker: the adopter of a dead downstream replica (the first, if several died: a
        # review's three deaths had two adopters take one id each way, and one stalled)
        gone = sorted(p for p in s.dead if (x := s.links.get(p)) is not None and x.side == "down")
        to = next((t for d in gone if (t := self.flow.recovery.adopter("down", d))), None)
        if not redo or to is None:
            return
        log.info(
            "stage %d: redoing %d forwards of %s in finished step %d: %s",
            c.k, len(redo), a.dead, a.step, redo,
        )  # fmt: skip
        for i in redo:
            if c.is_first:
                mb, z_in = c.batches.microbatch(a.step, i), None
            else:
                f = a.forwards[i]
                if a.grad_needed.get(i, True):
                    continue  # upstream lacks its gradient: not a forward's to give back
                mb, z_in = Microbatch(f.id, f.offsets, f.data_fingerprint), f.z
            try:
                z = c.compute(c.runtime.forward_past, mb, z_in)
            except ValueError as err:  # a peer's tensor of the wrong shape, or no version
                s.errors["bad_replay"] += 1
                log.warning("stage %d: cannot redo microbatch %s: %s", c.k, mb.id, err)
                continue
            L.redone[i] = to
            s.stats["recomputed"] += 1
            c.send(to, Forward(mb.id, z, mb.offsets, mb.fingerprint, grad_needed=False))

    def takes_redone(self, msg: Forward) -> bool:
        """A redone forward (adopt): ours to take only while we adopt a dead sibling's part of
        its step, which it may have been, and not one we hold already."""
        s = self.c.state
        L = s.ledger
        return (
            msg.id.step == s.step
            and msg.id.index not in L.z_in
            and any(
                st == s.step and a.confirmed and a.dead != s.node_id
                for (_, st), a in s.adoptions.items()
            )
        )

    def on_backward(self, peer: str, msg: Backward) -> bool:
        """The gradient for a forward we redid in a finished step: not wanted (its own was
        counted in that step's round). True if it was one."""
        s, mid = self.c.state, msg.id
        if not isinstance(mid, MicrobatchId) or not isinstance(mid.step, int):
            return False
        L = next((L for L in s.kept()[:-1] if L.step == mid.step), None)
        return L is not None and L.redone.get(mid.index) == peer
