"""Token-gated DHT records: a private swarm's records carry an HMAC keyed by its token.

Uses hivemind's own record-validation hook (the mechanism behind its RSA-signed records): the DHT
calls `sign_value` on every record it stores, `validate` on every record a peer asks it to store
and on every record a peer returns to a lookup, and `strip_value` before handing a value to us.
So a stranger in the DHT (no token, or another swarm's) can neither plant a record on a token
holder nor make a token holder believe one it serves, and everything that goes through this DHT
is covered, the averager's matchmaking and state-sharing keys included.

The tag binds key, subkey, value and expiration time, so a holder's record cannot be replayed
under another key or with a later expiry. It does not hide values (anyone in the DHT may read the
bytes), and a token holder can still store whatever it likes: the token is shared.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

MAGIC = b"\x00resbm-hmac1"  # marks a gated value; the tag follows it
TAG_BYTES = hashlib.sha256().digest_size
_DOMAIN = b"resbm dht records v1"  # this key is used for DHT records only, never as the token


class TokenRecordValidator(RecordValidatorBase):
    """Appends HMAC-SHA256(token-derived key, record) to each value; refuses records without it."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("a token-gated DHT needs a non-empty token")
        self._key = hmac.new(token.encode(), _DOMAIN, hashlib.sha256).digest()

    def _tag(self, record: DHTRecord, value: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (record.key, record.subkey or b"", value):
            mac.update(struct.pack(">Q", len(part)))
            mac.update(part)
        mac.update(struct.pack(">d", float(record.expiration_time)))
        return mac.digest()

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + MAGIC + self._tag(record, record.value)

    def validate(self, record: DHTRecord) -> bool:
        value = record.value
        cut = len(value) - TAG_BYTES - len(MAGIC)
        if cut < 0 or value[cut : cut + len(MAGIC)] != MAGIC:
            return False
        return hmac.compare_digest(value[-TAG_BYTES:], self._tag(record, value[:cut]))

    def strip_value(self, record: DHTRecord) -> bytes:
        value = record.value  # only called on records that passed validate()
        cut = len(value) - TAG_BYTES - len(MAGIC)
        if cut >= 0 and value[cut : cut + len(MAGIC)] == MAGIC:
            return value[:cut]
        return value

    @property
    def priority(self) -> int:
        # sign last and check first: the tag covers what the other validators (e.g. hivemind's
        # RSA signatures, priority 10) produced, and nothing unchecked is parsed
        return 100

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
