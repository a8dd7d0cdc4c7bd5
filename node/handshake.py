"""The signed Hello: each end of a link proves it holds the key its node id is derived from.

Three messages on the link's stream, before any work:

    dialer   -> acceptor   Hello(id_d, key_d, nonce_d)                      the offer
    acceptor -> dialer     Hello(id_a, key_a, nonce_a, sig_a)               the answer
    dialer   -> acceptor   Hello(id_d, key_d, nonce_d, sig_d)               the proof

`sig_a` signs ("accept", fingerprint, id_d, nonce_d, id_a, nonce_a) and `sig_d` signs ("dial",
fingerprint, id_a, nonce_a, id_d, nonce_d): each end signs the other's fresh challenge, so an old
Hello replayed from a capture proves nothing, and a signature made for one role or one swarm
config never passes for another. Before the answer is checked the dialer knows only an address;
after it, `dial()` also checks that the node there is the one the DHT record named (#10 H2: a
peer could take over a neighbour's link and receive its re-sent tensors).

What this does not give: secrecy or integrity of what follows on the stream (that is TLS's job,
`node/transport/security.py`), nor resistance to a peer that makes many keys (ids are cheap;
bans hold a key, see docs/security.md). Pure functions over `Hello`s; no I/O.
"""

from __future__ import annotations

from common.identity import Identity, nonce, transcript, verify
from node.version import VERSION
from node.wire.messages import Hello

DOMAIN = "resbm-link/1"


class Handshake:
    """One end's side of one link's handshake: its identity, stage and a fresh challenge."""

    def __init__(self, identity: Identity, stage: int, fingerprint: str):
        self.identity = identity
        self.stage = stage
        self.fingerprint = fingerprint
        self.nonce = nonce()

    def offer(self) -> Hello:
        """The dialer's first Hello: who it claims to be and the challenge for the acceptor."""
        return self._hello(b"")

    def answer(self, offer: Hello) -> Hello:
        """The acceptor's Hello: its claim, its challenge, and its signature over the offer's."""
        return self._hello(self._sign("accept", offer))

    def prove(self, answer: Hello) -> Hello:
        """The dialer's last Hello: its signature over the acceptor's challenge."""
        return self._hello(self._sign("dial", answer))

    def check_answer(self, answer: Hello) -> str | None:
        """Why the acceptor's answer does not prove its id (None: it does)."""
        return self._check("accept", answer)

    def check_proof(self, offer: Hello, proof: Hello) -> str | None:
        """Why the dialer's proof does not prove the id its offer claimed (None: it does)."""
        if (proof.peer_id, proof.public_key, proof.nonce) != (
            offer.peer_id,
            offer.public_key,
            offer.nonce,
        ):
            return "the proof names another node, key or challenge than the offer"
        return self._check("dial", proof)

    # ----------------------------------------------------------------------------------------
    def _hello(self, signature: bytes) -> Hello:
        ident = self.identity
        return Hello(
            self.stage, self.fingerprint, ident.node_id, VERSION, ident.public_key, self.nonce,
            signature,
        )  # fmt: skip

    def _sign(self, role: str, theirs: Hello) -> bytes:
        me = self.identity.node_id
        msg = transcript(
            DOMAIN, role, self.fingerprint, theirs.peer_id, theirs.nonce, me, self.nonce
        )
        return self.identity.sign(msg)

    def _check(self, role: str, theirs: Hello) -> str | None:
        if len(theirs.nonce) != len(self.nonce):
            return f"a challenge of {len(theirs.nonce)} bytes"
        if theirs.nonce == self.nonce:
            return "our own challenge came back (a reflected Hello)"
        me = self.identity.node_id
        msg = transcript(
            DOMAIN, role, self.fingerprint, me, self.nonce, theirs.peer_id, theirs.nonce
        )
        return verify(theirs.peer_id, theirs.public_key, msg, theirs.signature)
