"""Who a node is: an Ed25519 keypair, and a node id derived from its public key (#10 H2).

Before this, a node id was whatever a peer's Hello said, so a banned peer came back under a new
name, garbage sent "as X" got X banned, and a peer could take over a neighbour's link. Now an id
is `n-` and the first 80 bits (16 base32 letters) of SHA-256 over the raw public key: a peer
proves an id by signing a fresh challenge with the key it hashes from (`node/peering.py`'s
handshake, the coordinator's Join and Leave). Nobody can choose another node's id; making a new
identity costs a keypair, so bans hold a key, not a person (see docs/security.md).

The key lives in one file (PKCS#8 PEM, mode 0600) so a restarted node is the same node to the
swarm; a node given no file gets a fresh key and so a fresh id, as a random id was before.
This module is shared by node/ and coordinator/ (both verify), and imports neither.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ID_PREFIX = "n-"
ID_CHARS = 16  # base32 letters: 80 bits of the key's hash
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16
NODE_ID = re.compile(rf"^{ID_PREFIX}[a-z2-7]{{{ID_CHARS}}}$")  # what id_of makes, nothing else


class IdentityError(ValueError):
    """A key file that cannot be used, or a claim of identity that does not hold."""


def id_of(public_key: bytes) -> str:
    """The node id a raw Ed25519 public key stands for."""
    digest = hashlib.sha256(public_key).digest()
    return ID_PREFIX + base64.b32encode(digest).decode("ascii").lower()[:ID_CHARS]


def is_node_id(value) -> bool:
    """Whether `value` has the form of a derived node id (a key may stand behind it)."""
    return isinstance(value, str) and NODE_ID.fullmatch(value) is not None


def verify(node_id: str, public_key: bytes, message: bytes, signature: bytes) -> str | None:
    """Why `signature` does not prove that `node_id` signed `message`, or None if it does.
    Everything here comes from a peer: any length, any bytes."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return f"a public key of {len(public_key)} bytes, not {PUBLIC_KEY_BYTES}"
    if id_of(public_key) != node_id:
        return f"the key presented is not node {node_id}'s (its id would be {id_of(public_key)})"
    if len(signature) != SIGNATURE_BYTES:
        return f"a signature of {len(signature)} bytes, not {SIGNATURE_BYTES}"
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return f"a signature that node {node_id}'s key did not make"
    return None


def transcript(*parts: str | bytes | int) -> bytes:
    """An unambiguous byte string to sign: each part length-prefixed, so no two different lists
    of parts give the same bytes (a signature for one purpose never fits another)."""
    out = bytearray()
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


@dataclass(frozen=True)
class Identity:
    """This node's keypair; `node_id` is derived, never chosen."""

    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def for_node(cls, path: Path | None, claimed: str | None = None) -> Identity:
        """A node's identity: the key in `path` (made when missing), or a fresh one. `claimed`
        (an id a config or a restart carried) must be that key's id."""
        ident = cls.load_or_create(path) if path is not None else cls.generate()
        if claimed and claimed != ident.node_id:
            where = f"the key in {path}" if path is not None else "a fresh key"
            raise IdentityError(
                f"node id {claimed} is not the id of {where} ({ident.node_id}): a node id is "
                "derived from its key; give the key file it came from (identity_file)"
            )
        return ident

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """The key in `path`, made (mode 0600, parents created) when the file does not exist."""
        path = Path(path)
        if not path.exists():
            try:
                cls.generate().save(path)
            except OSError as err:  # a state dir we cannot write, no hard links, ...
                raise IdentityError(
                    f"cannot make the node key {path} (identity_file): {err}"
                ) from None
        return cls.load(path)

    def save(self, path: Path) -> None:
        """Write the key to `path` (mode 0600) unless a file is there already: two processes
        making the same file at once both end up with the first one's key."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Identity:
        with contextlib.suppress(OSError):
            if Path(path).stat().st_mode & 0o077:
                log.warning(
                    "the node key %s (identity_file) is readable by others: chmod 600 it", path
                )
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise IdentityError(
                f"cannot read the node key in {path} (identity_file): {err}; move it away to "
                "make a new identity (the node then has a new id)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} (identity_file) holds a {type(key).__name__}, not Ed25519")
        return cls(key)
