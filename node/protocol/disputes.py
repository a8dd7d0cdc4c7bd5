"""Stage 0: two replicas that split a step differently, and both send an id (#11; found by the
harness, overlapped seed 1185).

How it happens: a round finishes for some members only (hivemind's rounds are not atomic). A
joiner that got the result applies the step and splits the next one among the round's members,
itself included; its donor, whose answer failed, retries alone, applies the same sum and splits
the next step without the joiner. Both then send the ids they share, the downstream replica takes
the first forward of each, and each stage-0 replica waits for ever for the gradients of the
others (and their rounds never cover the step once: check_round).

How it heals: the downstream replica refuses the second forward of an id with ABORTED when the
first came from another stage-0 replica it has not seen die (flow.check_forward). The refused
sender notes the id (`StepLedger.taken`) and drops it from its share once the DHT shows the
disagreement: another live stage-0 replica at this step vouching for another state at its start
than ours (the split is in the digest replicas vouch for: syncing.digest). Then the next round
has each id once again, and its members agree on the next split.

Why the wait for the DHT: the refusal is the downstream node's word. Acting on it alone would
let one hostile downstream replica strip stage 0's shares (a review: both stage-0 replicas then
gave up on the step); a record is sealed by the stage-0 replica it names, so a stranger
downstream can use ABORTED only while stage 0's replicas really disagree.
"""

from __future__ import annotations

from node.data import MicrobatchId
from node.protocol.core import Core, log
from node.swarm.records import NodeState
from node.wire.messages import ErrorReport


class Disputes:
    def __init__(self, core: Core, adoption):
        self.c = core
        self.adoption = adoption  # adoption.Adopter

    def on_taken(self, peer: str, side: str, msg: ErrorReport) -> None:
        """A downstream replica holds `msg.id` of ours from another stage-0 replica."""
        c, s, mid = self.c, self.c.state, msg.id
        if not c.is_first or side != "down" or not isinstance(mid, MicrobatchId):
            return
        L = s.ledger
        if mid.step != L.step or not self.ours(mid.index, peer):
            return  # not this step (the next one's early ids are the split's to settle)
        L.taken[mid.index] = peer
        self.settle()

    def ours(self, i: int, peer: str) -> bool:
        """Is id `i` still a forward of our share that `peer` holds and nobody answers for
        otherwise: no re-send elsewhere, no replay, no gradient, no adoption open?"""
        c, L = self.c, self.c.state.ledger
        return (
            L.sent_to.get(i) == peer
            and i in L.share
            and i not in L.counted
            and i not in L.replayed
            and MicrobatchId(L.step, i) in c.runtime.pending
            and not self.adoption.adoptions_open()
        )

    def disagree(self) -> bool:
        """Does a live stage-0 replica at our step vouch for another state at its start?"""
        c, s = self.c, self.c.state
        ours = dict(s.vouches).get(s.step)
        if ours is None:
            return False
        return any(
            p != s.node_id
            and p not in s.dead
            and r.state is NodeState.online
            and r.step == s.step
            and any(v.step == s.step and v.digest != ours for v in r.vouches)
            for p, r in c.view.stage(0).items()
        )

    def settle(self) -> None:
        """Drop the taken ids that are still ours to drop, once the records show the split
        disagrees; forget the ones a recovery has taken over since."""
        c, s = self.c, self.c.state
        L = s.ledger
        if not L.taken or not c.is_first:
            return
        for i, peer in list(L.taken.items()):
            if not self.ours(i, peer):
                del L.taken[i]
        if not L.taken or not self.disagree():
            return
        for i in sorted(L.taken):
            mid = MicrobatchId(L.step, i)
            L.share.remove(i)
            del L.sent_to[i]
            L.z_out.pop(i, None)
            c.runtime.pending.pop(mid)
            s.window.sent.pop(mid, None)
            s.stats["taken_elsewhere"] += 1
            log.warning("stage %d: %s was sent by another replica first: not ours", c.k, mid)
        L.taken.clear()
