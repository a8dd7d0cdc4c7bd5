"""#10 C1: the digests members of an averaging group compare are signed by each member's node
key. Before, a relay (the reachable member that passes clients behind NAT each other's vectors
and digests) could forge one client's digest to another, and so hide that it had shown them
different vectors. In-process: one Gathering, the digests as they would come off the wire."""

from __future__ import annotations

import os

import pytest
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import PeerID

from common.identity import Identity
from node.swarm.gather import DIGEST_BYTES, Gathering
from node.swarm.p2p_key import peer_id_of


def _peer() -> PeerID:
    return PeerID(b"\x00\x24\x08\x01\x12\x20" + os.urandom(32))  # an identity multihash


@pytest.fixture
def group():
    ids = {name: Identity.generate() for name in ("me", "relay", "client")}
    peers = {name: PeerID(peer_id_of(ids[name].public_key)) for name in ids}  # p2p_key.py
    order = [peers["relay"], peers["me"], peers["client"]]
    info = GroupInfo(b"group-1", tuple(order), tuple(b"" for _ in order))
    modes = [AveragingMode.NODE, AveragingMode.CLIENT, AveragingMode.CLIENT]
    keys = {peers[n]: ids[n].public_key for n in ids}

    def member(name: str, relays: bytes = b"relay" * 4) -> Gathering:
        """`relays`: the relay's vector as this member got it."""
        g = Gathering(info, peers[name], name.encode() * 4, modes, keys, ids[name])
        for other in ids:
            if other != name:
                g.got_vector(peers[other], relays if other == "relay" else other.encode() * 4)
        return g

    return member, peers


def test_a_members_signed_digest_is_taken_and_a_forged_one_fails_the_round(group):
    member, peers = group
    client, me = member("client", relays=b"other" * 4), member("me")  # a relay equivocated
    signed = client.signed_digest()
    assert len(signed) > DIGEST_BYTES
    me.got_digest(peers["client"], signed)  # passed on by the relay, as sent
    assert me.failure is None and me.digests[peers["client"]] == client.digest()
    assert me.signed[peers["client"]] == signed  # what a relay passes on
    assert client.digest() != me.digest()  # so the round fails for us: the relay is caught

    for forged in (
        me.digest() + signed[DIGEST_BYTES:],  # the relay's claim that the client saw our view
        signed[:DIGEST_BYTES],  # no signature
        member("relay").signed_digest(),  # signed, by another member's key
    ):
        other = member("me")
        other.got_digest(peers["client"], forged)
        assert other.failure is not None and "digest" in other.failure, forged


def test_a_member_whose_info_names_no_key_fails_the_round(group):
    member, peers = group
    g = member("me")
    g.keys.pop(peers["client"])
    g.got_digest(peers["client"], member("client").signed_digest())
    assert g.failure is not None and "no key" in g.failure


def test_a_member_whose_peer_id_is_not_its_keys_fails_the_round_at_once():
    """A leader's member of its own making in an honest member's slot (its own key): the
    Gathering fails before any vector is sent, for every honest member it is shown to
    (node/swarm/p2p_key.py). A malformed key is left to admission (it leaves the member out)."""
    me, forger = Identity.generate(), Identity.generate()
    mine, slot = PeerID(peer_id_of(me.public_key)), _peer()
    info = GroupInfo(b"group-2", (mine, slot), (b"", b""))
    modes = [AveragingMode.NODE, AveragingMode.NODE]
    g = Gathering(info, mine, b"me" * 4, modes, {mine: me.public_key, slot: forger.public_key}, me)
    assert g.failure is not None and "not its node key's" in g.failure
    g = Gathering(info, mine, b"me" * 4, modes, {mine: me.public_key, slot: b"short"}, me)
    assert g.failure is None
