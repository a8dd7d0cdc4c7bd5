"""Node keys and the signed Hello (#10 H2): ids derived from keys, key files, and each way a
handshake message can fail to prove who sent it."""

from __future__ import annotations

import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from common.identity import Identity, IdentityError, id_of, transcript, verify
from node.handshake import Handshake
from node.wire.codec import WireCodec
from node.wire.kinds import NODE_ID_PATTERN
from node.wire.messages import from_pb, to_pb

FP = "0123456789abcdef"
MODEL = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 16}


def test_an_id_is_derived_from_the_key_and_fits_the_node_id_pattern():
    a, b = Identity.generate(), Identity.generate()
    assert a.node_id == id_of(a.public_key) != b.node_id
    assert re.fullmatch(NODE_ID_PATTERN, a.node_id) and len(a.node_id) == 18


def test_a_key_file_is_made_once_private_and_read_back(tmp_path):
    path = tmp_path / "state" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).node_id == first.node_id  # a restart: the same node
    assert Identity.for_node(path, first.node_id).node_id == first.node_id
    with pytest.raises(IdentityError, match="identity_file"):
        Identity.for_node(path, Identity.generate().node_id)  # an id this key does not make
    path.write_text("not a key")
    with pytest.raises(IdentityError, match="identity_file"):
        Identity.load(path)


def test_verify_names_what_is_wrong():
    me, other = Identity.generate(), Identity.generate()
    msg = transcript("x", 1, b"\0")
    sig = me.sign(msg)
    assert verify(me.node_id, me.public_key, msg, sig) is None
    assert "is not node" in verify(me.node_id, other.public_key, msg, sig)
    assert "did not make" in verify(me.node_id, me.public_key, msg + b"!", sig)
    assert "did not make" in verify(other.node_id, other.public_key, msg, sig)
    assert "bytes" in verify(me.node_id, me.public_key[:5], msg, sig)
    assert "bytes" in verify(me.node_id, me.public_key, msg, sig * 2)
    assert transcript("ab", "c") != transcript("a", "bc")  # parts cannot slide into each other


def wire(hello):
    """Through protobuf and back, as a peer's Hello arrives."""
    return from_pb(to_pb(hello, WireCodec.fp32), (1, 1, 1), 1)


def test_an_honest_handshake_proves_both_ids_through_the_wire():
    dialer = Handshake(Identity.generate(), 0, FP)
    acceptor = Handshake(Identity.generate(), 1, FP)
    offer = wire(dialer.offer())
    answer = wire(acceptor.answer(offer))
    assert dialer.check_answer(answer) is None
    proof = wire(dialer.prove(answer))
    assert acceptor.check_proof(offer, proof) is None


def test_each_forgery_of_a_handshake_is_refused():
    dialer, acceptor = Handshake(Identity.generate(), 0, FP), Handshake(Identity.generate(), 1, FP)
    offer = dialer.offer()
    answer = acceptor.answer(offer)
    proof = dialer.prove(answer)
    # the answer reused as a proof (another role), or for another swarm config
    assert acceptor.check_proof(offer, replace(answer, nonce=offer.nonce)) is not None
    other_swarm = Handshake(dialer.identity, 0, "f" * 16)
    assert acceptor.check_proof(offer, other_swarm.prove(answer)) is not None
    # a proof for another acceptor's challenge (a replay)
    elsewhere = Handshake(Identity.generate(), 1, FP).answer(offer)
    assert acceptor.check_proof(offer, dialer.prove(elsewhere)) is not None
    # a proof that names another node than the offer did
    assert "another node" in acceptor.check_proof(offer, replace(proof, peer_id="n-x"))
    # our own challenge reflected back at us
    assert "reflected" in dialer.check_answer(replace(answer, nonce=dialer.nonce))
    # a challenge of the wrong size, and no signature at all
    assert acceptor.check_proof(offer, replace(proof, nonce=b"x")) is not None
    assert dialer.check_answer(replace(answer, signature=b"")) is not None


def test_a_moved_node_hands_its_fresh_key_over_privately_and_the_restart_removes_it(tmp_path):
    """A node without a key file that moves stage restarts as the same node: the key goes
    through a 0700 temp directory that the restarted process reads and removes (review: it
    was a file in /tmp, never removed)."""
    import tempfile

    from node.node_config import NodeConfig
    from node.process import HANDOVER_PREFIX, with_identity

    ident = Identity.generate()
    box = Path(tempfile.mkdtemp(prefix=HANDOVER_PREFIX))
    assert stat.S_IMODE(box.stat().st_mode) == 0o700
    ident.save(box / "identity.key")
    cfg = NodeConfig(model=MODEL, identity_file=box / "identity.key", node_id=ident.node_id)
    cfg, loaded = with_identity(cfg)
    assert loaded.node_id == cfg.node_id == ident.node_id
    assert not box.exists() and cfg.identity_file is None
    kept = tmp_path / "identity.key"  # a key file of the user's own is never removed
    ident.save(kept)
    cfg, _ = with_identity(NodeConfig(model=MODEL, identity_file=kept))
    assert kept.is_file() and cfg.identity_file == kept


def test_a_key_file_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")  # (as root, modes do not stop a write)
    with pytest.raises(IdentityError, match="identity_file"):
        Identity.load_or_create(tmp_path / "file" / "sub" / "identity.key")
