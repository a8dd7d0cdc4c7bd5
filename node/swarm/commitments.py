"""What a member of a stage's averaging group signs (node/swarm/averaging.py).

A member's round info is signed by its node key over the stage's prefix, its hivemind peer id
and the whole info, including `commit`: the SHA-256 of the vector it will send, fixed before the
group forms. A vector that does not hash to its member's commitment is left out, and two members
committed to the same vector void the round. This stops a copy within one attempt only: a member
that lets an attempt fail after it got an honest member's vector can commit to a near copy of it
in the next (docs/security.md, open: a review found that remembering commitments across attempts
can be bypassed, and shuts out an honest member that restarts mid-step)."""

from __future__ import annotations

from common.identity import transcript

DOMAIN = "resbm-round/2"  # what a member's round signature is for


def round_claim(prefix: str, peer_id: bytes, info: dict) -> bytes:
    """What a member signs: the whole info (but the signature), as hivemind serializes it (a
    decoded info serializes to the same bytes: msgpack keeps the order of its keys)."""
    from hivemind.utils.serializer import MSGPackSerializer

    body = MSGPackSerializer.dumps({k: v for k, v in info.items() if k != "sig"})
    return transcript(DOMAIN, prefix, peer_id, body)
