"""DHT records under a node id are signed by that node (#10 H1, H6, M1).

Anyone in the DHT can store anything under any key. Before this, a stranger could write a
tombstone under a victim's id (the victim vanished from every view), mark it `draining` (nobody
routed to it), give it a step two ahead (its replicas resynced, again and again), or point its
checkpoint record anywhere. Now a value stored under a subkey that is a node id (`n-` and 16
base32 letters, common/identity.py) must be an envelope sealed by the key that id is derived from:

    {"owned": ENVELOPE, "body": msgpack(payload), "key": public key, "sig": signature}

The signature covers the DHT key (as hivemind hashes it), the subkey, the body and the record's
expiration time, so a node's record cannot be replayed under another stage's key, nor with a
later expiry (the DHT keeps whichever value of a subkey expires last: an old record replayed
with a far expiry would otherwise shadow the node's fresh ones). Tombstones are sealed too.

`OwnerValidator` is installed in every DHT this project starts (hivemind calls `validate` on
every record a peer asks it to store and on every record a lookup returns), and `open_sealed`
checks again in our own process, so a record is used only if its owner made it. It needs no
private key: sealing happens in our process, before `store`. What it does not stop: a stranger
writing its *own* records (one per key it makes; see docs/security.md).
"""

from __future__ import annotations

from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from common.identity import Identity, is_node_id, transcript, verify
from node.swarm.records import checkpoint_key, joins_key, manifest_key, moves_key, stage_key

ENVELOPE = "resbm-owned/1"
MAX_BODY = 64 << 10  # a record is a few hundred bytes
MAX_STAGES = 1024  # the keys a swarm's validator guards: stage/k and checkpoints/k below this


class SealError(ValueError):
    """A value under a node id that its owner did not seal."""


is_owned = is_node_id  # a subkey of this form: only its node may write under it


def _signed(key_bytes: bytes, subkey_bytes: bytes, body: bytes, expiration: float) -> bytes:
    return transcript(ENVELOPE, key_bytes, subkey_bytes, body, repr(float(expiration)))


def seal(identity: Identity, key: str, payload: Any, expiration: float) -> dict[str, Any]:
    """The value to store under (`key`, our id) so that it expires at `expiration`."""
    body = MSGPackSerializer.dumps(payload)
    key_bytes = DHTID.generate(source=key).to_bytes()
    subkey_bytes = MSGPackSerializer.dumps(identity.node_id)
    sig = identity.sign(_signed(key_bytes, subkey_bytes, body, expiration))
    return {"owned": ENVELOPE, "body": body, "key": identity.public_key, "sig": sig}


def _check(key_bytes: bytes, subkey: str, subkey_bytes: bytes, value: Any, exp: float) -> Any:
    """The payload of a sealed value, or SealError."""
    if not isinstance(value, dict) or value.get("owned") != ENVELOPE:
        raise SealError(f"a value under node id {subkey} that is not sealed")
    body, key, sig = value.get("body"), value.get("key"), value.get("sig")
    if not all(isinstance(x, bytes) for x in (body, key, sig)) or len(body) > MAX_BODY:
        raise SealError(f"a malformed seal under node id {subkey}")
    why = verify(subkey, key, _signed(key_bytes, subkey_bytes, body, exp), sig)
    if why is not None:
        raise SealError(why)
    return MSGPackSerializer.loads(body)


def open_sealed(key: str, subkey: str, value: Any, expiration: float) -> Any:
    """The payload `subkey`'s owner sealed under `key`; SealError if it did not."""
    key_bytes = DHTID.generate(source=key).to_bytes()
    return _check(key_bytes, subkey, MSGPackSerializer.dumps(subkey), value, expiration)


class OwnerValidator(RecordValidatorBase):
    """Refuses a record under a node-id subkey unless that node sealed it (see the module doc).
    Given the swarm, it also guards that swarm's node-owned keys whole (stage/k, checkpoints/k,
    and the manifest, moves and joins/k, sealed by whoever stored them: #10 M1, H6): a plain
    value, or one under another subkey, stored there with a later expiry would replace every
    node's record (hivemind keeps whichever expires last: review). Other records pass. (A far expiry
    is no longer refused on the coordinator's keys: readers take only its own subkey, and a
    check on the reader's clock made hivemind drop a whole answer: review.)"""

    def __init__(self, swarm: str | None = None):
        self.owned_keys: set[bytes] = set()
        if swarm:
            for k in range(MAX_STAGES):
                for key in (stage_key(swarm, k), checkpoint_key(swarm, k), joins_key(swarm, k)):
                    self.owned_keys.add(DHTID.generate(source=key).to_bytes())
            for key in (moves_key(swarm), manifest_key(swarm)):  # sealed by their signer (M1)
                self.owned_keys.add(DHTID.generate(source=key).to_bytes())

    def validate(self, record: DHTRecord) -> bool:
        guarded = record.key in self.owned_keys
        if not record.subkey:
            return not guarded
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return not guarded  # not ours to judge: not a string subkey
        if not is_owned(subkey):
            return not guarded
        try:
            value = MSGPackSerializer.loads(record.value)
            _check(record.key, subkey, record.subkey, value, record.expiration_time)
        except Exception:  # SealError, or bytes that are no msgpack: refused, never raised
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value  # sealed by the caller (`seal`): the DHT child holds no key

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 10  # under the token's HMAC (100), which then covers the seal

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
