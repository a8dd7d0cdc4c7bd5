"""Exact recovery after the update: a dead replica's part of a step our stage has applied.

Its microbatches were counted in that step's round, so nothing is added to any update here.
What can still be missing is what it sent on and nobody holds any more, for a neighbour still
in that step:

- a z it sent to a downstream replica that died too, whose adopter cannot finish the step
  without it (two deaths in a row: harness seeds 5 and 378 of the overlapped schedule);
- a gradient it owed upstream: the overlapped schedule applies a stage's update once its
  upstream replicas have forwarded everything, before they hold every gradient it sends them
  (schedule.Overlapped.part_done), so a replica that dies right after its update can take one
  with it.

Both are computed again at the weights the step ran them at (StageRuntime.forward_past and
backward_past: the stage keeps the last finished step's), so they are the ones lost, bit for
bit. Only the step before ours (`Adopter.redoes`): a neighbour further behind than that is
resynced, not helped.
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
        the z it had sent it (and whether it still needs the gradient), a live downstream
        replica that holds one of its z said so (a claim, with the gradient it sent back).

        - Upstream lacks the gradient: redo it from the claim's gradient (the last stage:
          from the loss) and send it. Without a claim the z never reached a live replica:
          redo the forward too; the gradient that comes back is then sent on (`on_backward`).
        - Upstream holds it, and no live downstream replica holds the z: redo the forward and
          send it as a plain forward; whichever downstream replica takes it does its step's
          work, and one that has it already refuses it. Not if every downstream record is
          past the step (their rounds covered every id)."""
        c, s = self.c, self.c.state
        a.done = True
        L = next(L for L in s.kept() if L.step == a.step)
        if a.dead == s.node_id:  # our own id: a link of ours flapped and lost a gradient in
            for i in sorted(a.forwards):  # flight; we hold it (Adopter.redeliver, finished)
                up = a.up_of.get(i, "")
                if a.grad_needed.get(i, True) and i in L.grad_in and s.live("up").get(up):
                    c.send(up, Backward(MicrobatchId(a.step, i), L.grad_in[i]))
            return
        downs = [] if c.is_last else list(c.view.stage(c.k + 1).values())
        behind = any(getattr(rec, "step", a.step) <= a.step for rec in downs)
        ids = set(L.split.get(a.dead, ())) if c.is_first else set(a.forwards)  # stage 0: its share
        todo = sorted(i for i in ids if i not in L.z_out and i not in L.redone)
        sent = grads = 0
        for i in todo:
            needed = not c.is_first and a.grad_needed.get(i, True)
            claim = a.claims.get(i)
            if needed and (c.is_last or (claim is not None and claim[1] is not None)):
                grads += self.gradient(a, i, None if c.is_last else claim[1])
            elif claim is None and not c.is_last and (needed or behind):
                sent += self.forward(a, L, i)
        if sent or grads:
            log.info(
                "stage %d: %s's part of finished step %d: %d forwards and %d gradients redone",
                c.k, a.dead, a.step, sent, grads,
            )  # fmt: skip

    def _microbatch(self, a: Adoption, i: int):
        c = self.c
        if c.is_first:
            return c.batches.microbatch(a.step, i), None
        f = a.forwards[i]
        return Microbatch(f.id, f.offsets, f.data_fingerprint), f.z

    def forward(self, a: Adoption, L, i: int) -> int:
        c, s = self.c, self.c.state
        dst = self.flow.route()
        if dst is None:
            return 0  # no downstream replica: reopened by the next replay, if any
        mb, z_in = self._microbatch(a, i)
        try:
            z = c.compute(c.runtime.forward_past, mb, z_in)
        except ValueError as err:  # a peer's tensor of the wrong shape, or no version
            s.errors["bad_replay"] += 1
            log.warning("stage %d: cannot redo microbatch %s: %s", c.k, mb.id, err)
            return 0
        L.redone[i] = dst
        s.stats["recomputed"] += 1
        c.send(dst, Forward(mb.id, z, mb.offsets, mb.fingerprint))
        return 1

    def gradient(self, a: Adoption, i: int, grad_out) -> int:
        c, s = self.c, self.c.state
        mb, z_in = self._microbatch(a, i)
        try:
            grad = c.compute(c.runtime.backward_past, mb, z_in, grad_out)
        except ValueError as err:  # a peer's tensor of the wrong shape, or no version
            s.errors["bad_replay"] += 1
            log.warning("stage %d: cannot redo microbatch %s: %s", c.k, mb.id, err)
            return 0
        up = a.up_of.get(i, "")
        if s.live("up").get(up) is None:
            return 0  # it died too: nobody to send it to
        s.stats["recomputed"] += 1
        c.send(up, Backward(MicrobatchId(a.step, i), grad))
        return 1

    def on_backward(self, peer: str, msg: Backward) -> bool:
        """A gradient for a forward we redid in a finished step (`forward`): ours to handle.
        Upstream waits for it if the dead replica owed it (its adoption says so): send it on,
        computed at the step's weights; else it is not wanted."""
        s, mid = self.c.state, msg.id
        if not isinstance(mid, MicrobatchId) or not isinstance(mid.step, int):
            return False
        L = next((L for L in s.kept()[:-1] if L.step == mid.step), None)
        if L is None or L.redone.get(mid.index) != peer:
            return False
        for (_, step), a in s.adoptions.items():
            i = mid.index
            if step == mid.step and i in a.forwards and a.grad_needed.get(i, True):
                if msg.grad is not None and i not in L.grad_out:
                    L.grad_out[i] = msg.grad  # once: a second copy is not sent twice
                    self.gradient(a, i, msg.grad)
                break
        return True
