"""`resbm certs`: a private swarm's certificate authority and one certificate per machine.

The CA is made once and reused: running the command again (say, for a new node) signs new
certificates with the same CA, so the ones already handed out stay valid. Every certificate names
the same DNS name (node.transport.security.SWARM_SAN) and is good for both ends of a connection
(server and client auth), because a node both serves its stage and dials its neighbours.
Private keys are written 0600 and never overwritten silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CA_DAYS = 3650
CERT_DAYS = 825


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="make a CA and node certificates for a private swarm (mutual TLS)",
        description="Make (once) a certificate authority for the swarm in --out (ca.pem, "
        "ca-key.pem), then a certificate and key signed by it for each name (NAME.pem, "
        "NAME-key.pem). Reuses the CA when it exists. Hand every machine ca.pem and its own pair; "
        "keep ca-key.pem offline.",
    )
    p.add_argument("--out", required=True, type=Path, help="directory for the files")
    p.add_argument("--swarm", required=True, help="swarm id (goes into the CA's name)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--nodes", type=int, help="make node-0 .. node-(N-1) (default 1 node)")
    who.add_argument("--names", nargs="+", metavar="NAME", help="e.g. coordinator node-a admin")
    p.add_argument("--days", type=int, default=CERT_DAYS, help="certificate validity (days)")
    p.add_argument("--force", action="store_true", help="replace certificates that exist")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.nodes is not None and args.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    names = args.names if args.names else [f"node-{i}" for i in range(args.nodes or 1)]
    made = make_certs(args.out, args.swarm, names, days=args.days, force=args.force)
    for path in made:
        print(path)
    print(
        f"CA: {args.out / 'ca.pem'} (give to every machine); keep {args.out / 'ca-key.pem'} "
        "private. Use: --tls-cert NAME.pem --tls-key NAME-key.pem --tls-ca ca.pem",
        file=sys.stderr,
    )
    return 0


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; a key is created 0600 from the start (never readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600 if private else 0o644)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_or_make_ca(out: Path, swarm: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    cert_path, key_path = out / "ca.pem", out / "ca-key.pem"
    if cert_path.exists() != key_path.exists():
        raise ValueError(f"{out} has only one of ca.pem and ca-key.pem: restore or remove it")
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        return cert, key, False
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"resbm swarm {swarm} CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, _cert_pem(cert), private=False)
    return cert, key, True


def _issue(ca_cert, ca_key, name: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from node.transport.security import SWARM_SAN

    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SWARM_SAN)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_certs(
    out: Path, swarm: str, names: list[str], days: int = CERT_DAYS, force: bool = False
) -> list[Path]:
    """Make the CA if `out` has none, then NAME.pem / NAME-key.pem for each name. Returns the
    paths written. A name whose files exist is refused unless `force`."""
    out = Path(out)
    # NAME-key.pem is a key file: a name ending in -key would overwrite another name's key
    bad = [n for n in names if not NAME.match(n) or n == "ca" or n.endswith("-key")]
    if bad:
        raise ValueError(f"certificate names {bad}: use letters, digits, '.', '_', '-'")
    if len(set(names)) != len(names):
        raise ValueError(f"certificate names repeat: {names}")
    if days < 1:
        raise ValueError("--days must be at least 1")
    taken = [n for n in names if not force and (out / f"{n}.pem").exists()]
    if taken:
        raise ValueError(f"{out} already has certificates for {taken}: pass --force to replace")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, new_ca = _load_or_make_ca(out, swarm)
    written = [out / "ca.pem", out / "ca-key.pem"] if new_ca else []
    for name in names:
        cert, key = _issue(ca_cert, ca_key, name, days)
        _write(out / f"{name}-key.pem", _key_pem(key), private=True)
        _write(out / f"{name}.pem", _cert_pem(cert), private=False)
        written += [out / f"{name}.pem", out / f"{name}-key.pem"]
    return written
