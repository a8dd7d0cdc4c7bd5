"""Sealed DHT records (node/swarm/owned.py): the validator hivemind calls, and the check in our
own process, each on what a stranger could store."""

from __future__ import annotations

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer as S

from common.identity import Identity
from node.swarm.owned import OwnerValidator, SealError, is_owned, open_sealed, seal

ME, OTHER = Identity.generate(), Identity.generate()
KEY = "swarm/stage/1"


def record(value, key=KEY, subkey=ME.node_id, exp=100.0) -> DHTRecord:
    """A record as hivemind hands it to a validator: key hashed, subkey and value serialized."""
    return DHTRecord(DHTID.generate(source=key).to_bytes(), S.dumps(subkey), S.dumps(value), exp)


def test_a_sealed_record_opens_and_nothing_else_under_a_node_id_does():
    v = OwnerValidator()
    sealed = seal(ME, KEY, {"step": 3}, 100.0)
    assert v.validate(record(sealed)) and open_sealed(KEY, ME.node_id, sealed, 100.0) == {"step": 3}
    tombstone = seal(ME, KEY, None, 100.0)
    assert v.validate(record(tombstone)) and open_sealed(KEY, ME.node_id, tombstone, 100.0) is None
    bad = {
        "unsealed": record({"step": 3}),
        "another key's seal": record(seal(OTHER, KEY, {"step": 3}, 100.0)),
        "a later expiry": record(sealed, exp=101.0),
        "another DHT key": record(sealed, key="swarm/stage/0"),
        "a changed body": record({**sealed, "body": S.dumps({"step": 4})}),
        "bytes that are no msgpack": DHTRecord(b"k", S.dumps(ME.node_id), b"\xc1\xc1", 1.0),
        "a huge body": record({**sealed, "body": b"x" * (1 << 20)}),
    }
    for what, rec in bad.items():
        assert not v.validate(rec), what
    with pytest.raises(SealError):
        open_sealed(KEY, ME.node_id, {"step": 3}, 100.0)
    with pytest.raises(SealError):
        open_sealed(KEY, ME.node_id, sealed, 101.0)


def test_other_records_pass_untouched():
    v = OwnerValidator()
    assert v.validate(DHTRecord(b"k", b"", S.dumps({"any": 1}), 1.0))  # the manifest
    assert v.validate(record({"x": 1}, subkey="QmHivemindPeer"))  # hivemind's averaging keys
    assert v.validate(record({"x": 1}, subkey="move/" + ME.node_id))  # the coordinator's
    assert is_owned(ME.node_id) and not is_owned("n-short") and not is_owned(ME.node_id + "\n")
    rec = record({"x": 1})
    assert v.sign_value(rec) == rec.value == v.strip_value(rec)


def test_a_checkpoint_record_names_no_path(tmp_path, monkeypatch):
    """#10 M3: a checkpoint record told every DHT reader an absolute path (user names). Now it
    carries a tag of the directory: the same for one directory however it is written, another
    per swarm, and a record with a path is refused as malformed."""
    from node.swarm.records import checkpoint_place, parse_checkpoint_records

    d = tmp_path / "alice" / "ckpt"
    d.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    tag = checkpoint_place(d, "s")
    assert tag == checkpoint_place("alice/ckpt/", "s") == checkpoint_place(f"{d}/../ckpt", "s")
    assert tag != checkpoint_place(d, "t") and "alice" not in tag
    good = {"peer_id": ME.node_id, "place": tag, "step": 3}
    assert parse_checkpoint_records({ME.node_id: good}, 0)[ME.node_id].place == tag
    old = {"peer_id": ME.node_id, "path": str(d), "step": 3}
    assert parse_checkpoint_records({ME.node_id: old}, 0) == {}
