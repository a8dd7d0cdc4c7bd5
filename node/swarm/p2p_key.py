"""A node's hivemind (libp2p) peer id is its node key's (#10 C1).

A member of a stage's averaging group signs its round info with its node key, over the hivemind
peer id it sends from. Nothing tied the two: a group's leader, which relays for clients behind
NAT, could show such a client a member of its own making in an honest member's slot (its own
key, signing over the honest member's peer id). So the node key *is* the libp2p key: a node's
DHT (and the averager, which shares the DHT's p2p daemon) runs under a libp2p Ed25519 key made
from the node's Ed25519 key, and its peer id follows from the public key alone. A member whose
slot's peer id is not the one its key gives is left out (node/swarm/averaging.py), wherever
its vector came from.

One key for two protocols: libp2p signs its handshakes under its own prefixes
("noise-libp2p-static-key:", "libp2p-tls-handshake:"), every signature of ours starts with a
"resbm-..." domain (common/identity.transcript), so neither can be passed off as the other.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from cryptography.hazmat.primitives import serialization

from common.identity import PUBLIC_KEY_BYTES, Identity, id_of

ED25519 = 1  # libp2p's crypto.pb KeyType
IDENTITY_MULTIHASH = b"\x00"  # libp2p inlines a public key of 42 bytes or fewer in its id


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (the lengths here are all under 128)."""
    return bytes([number << 3 | 2, len(data)]) + data


def _key_message(data: bytes) -> bytes:
    """libp2p's crypto.pb PublicKey / PrivateKey: key_type = Ed25519, data. Written out
    (seven bytes of framing) rather than through hivemind's generated module, so a process
    that never starts a DHT need not import hivemind to check a member."""
    return bytes([1 << 3 | 0, ED25519]) + _field(2, data)


def peer_id_of(public_key: bytes) -> bytes:
    """The libp2p peer id (multihash bytes, as `PeerID.to_bytes()`) of a raw Ed25519 key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key of {len(public_key)} bytes, not {PUBLIC_KEY_BYTES}")
    encoded = _key_message(public_key)
    return IDENTITY_MULTIHASH + bytes([len(encoded)]) + encoded


def averager_binds(node_id: str, averager: str) -> bool:
    """Is `averager` (a peer id in base58, as a node record names its state's donor) the peer
    id of `node_id`'s key? An Ed25519 peer id holds the public key itself, so the record alone
    tells: a record naming another node's averager sent joiners' downloads there (a review)."""
    import base58  # hivemind's dependency

    head = peer_id_of(bytes(PUBLIC_KEY_BYTES))[:-PUBLIC_KEY_BYTES]
    try:
        raw = base58.b58decode(averager)
    except ValueError:
        return False
    key = raw[len(head) :]
    return raw.startswith(head) and len(key) == PUBLIC_KEY_BYTES and id_of(key) == node_id


def private_key_file_bytes(identity: Identity) -> bytes:
    """What libp2p reads as a private key: Ed25519's 32-byte seed, then its public key."""
    seed = identity.key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return _key_message(seed + identity.public_key)


@contextlib.contextmanager
def key_file(identity: Identity) -> Iterator[str]:
    """The key in a file only we can read, for the p2p daemon to load at start; removed after
    (the node's own key file, not this copy, is what lasts)."""
    with tempfile.TemporaryDirectory(prefix="resbm-p2p-") as d:  # mode 0700
        path = os.path.join(d, "p2p.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_file_bytes(identity))
        yield path
