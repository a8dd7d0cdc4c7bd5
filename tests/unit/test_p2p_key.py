"""#10 C1: a node's hivemind peer id is its node key's (node/swarm/p2p_key.py), and a member of
an averaging group whose peer id is not its key's is left out. Before, a leader relaying for a
client behind NAT could show that client a member of its own making in an honest member's slot:
its own key, signing over the honest member's peer id. In-process; the real p2p daemon under
such a key is in tests/adversarial/test_averaging.py."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from common.identity import Identity
from node.swarm.averaging import StageAverager
from node.swarm.commitments import round_claim
from node.swarm.p2p_key import averager_binds, peer_id_of, private_key_file_bytes

NUMEL = 4


def test_the_peer_id_is_libp2ps_for_the_node_key():
    me = Identity.generate()
    public = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=me.public_key)
    encoded = public.SerializeToString()
    assert peer_id_of(me.public_key) == b"\x00" + bytes([len(encoded)]) + encoded
    # libp2p's Ed25519 peer ids all read "12D3KooW..." in base58
    assert PeerID(peer_id_of(me.public_key)).to_base58().startswith("12D3KooW")
    private = crypto_pb2.PrivateKey.FromString(private_key_file_bytes(me))
    assert private.key_type == crypto_pb2.Ed25519 and len(private.data) == 64
    assert private.data[32:] == me.public_key  # seed, then the public key: what libp2p reads
    assert peer_id_of(Identity.generate().public_key) != peer_id_of(me.public_key)
    with pytest.raises(ValueError, match="33 bytes"):
        peer_id_of(bytes(33))


def _averager(identity: Identity) -> StageAverager:
    """admit() alone: no DHT, no child process."""
    avg = object.__new__(StageAverager)
    avg.numel, avg.prefix, avg.identity, avg.last_failure = NUMEL, "stage0", identity, ""
    return avg


def _member(identity: Identity, peer: PeerID, value: float, ids: list[int]) -> dict:
    raw = torch.full((NUMEL + 1,), value).numpy().tobytes()
    info = {"step": 0, "ids": ids, "node": identity.node_id, "key": identity.public_key}
    info["commit"] = hashlib.sha256(raw).hexdigest()
    info["sig"] = identity.sign(round_claim("stage0", peer.to_bytes(), info))
    return {"info": info, "vector": raw}


def test_a_member_in_a_slot_that_is_not_its_keys_is_left_out(caplog):
    me, honest, forger = (Identity.generate() for _ in range(3))
    mine, theirs = (PeerID(peer_id_of(i.public_key)) for i in (me, honest))
    gathered = {mine: _member(me, mine, 1.0, [0]), theirs: _member(honest, theirs, 2.0, [1])}
    got = _averager(me).admit(gathered)
    assert got is not None and [m["node"] for m in got.members] == sorted(
        [me.node_id, honest.node_id]
    )
    # the forger signs, with its own key, over the honest member's peer id: its signature
    # holds, but the slot is not its key's
    gathered[theirs] = _member(forger, theirs, 1e6, [1])
    with caplog.at_level(logging.WARNING, logger="node.swarm.averaging"):
        got = _averager(me).admit(gathered)
    assert got is not None and [m["node"] for m in got.members] == [me.node_id]
    assert "its peer id is not its node key's" in caplog.text


def test_a_record_names_only_its_own_nodes_averager():
    """A node record names its state's donor (its averager's peer id): a stranger's record that
    named an honest replica's averager sent joiners' downloads there. An Ed25519 peer id holds
    its public key, so the record alone says whether the averager is its node's."""
    me, other = Identity.generate(), Identity.generate()
    mine = PeerID(peer_id_of(me.public_key)).to_base58()
    assert averager_binds(me.node_id, mine)
    assert not averager_binds(other.node_id, mine)
    rsa_style = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a sha256 peer id
    for bad in (rsa_style, "0OIl", "", mine[:-2]):
        assert not averager_binds(me.node_id, bad), bad
