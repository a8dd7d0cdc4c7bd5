"""`resbm certs`: a reusable CA, 0600 keys, the swarm's fixed SAN, certificates that verify."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from node.transport.security import SWARM_SAN
from resbm.certs import make_certs
from resbm.cli import main


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_makes_ca_and_signed_node_certs(tmp_path):
    assert main(["certs", "--out", str(tmp_path), "--swarm", "tiny", "--nodes", "2"]) == 0
    ca = _cert(tmp_path / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("node-0", "node-1"):
        cert = _cert(tmp_path / f"{name}.pem")
        cert.verify_directly_issued_by(ca)  # raises if not signed by the swarm's CA
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [SWARM_SAN]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert _mode(tmp_path / f"{name}-key.pem") == 0o600
    assert _mode(tmp_path / "ca-key.pem") == 0o600


def test_ca_is_reused_and_new_certs_chain_to_it(tmp_path):
    first = make_certs(tmp_path, "tiny", ["coordinator"])
    assert tmp_path / "ca-key.pem" in first
    ca_bytes = (tmp_path / "ca.pem").read_bytes()
    key_bytes = (tmp_path / "ca-key.pem").read_bytes()
    again = make_certs(tmp_path, "tiny", ["node-a", "node-b"])
    assert tmp_path / "ca.pem" not in again  # not rewritten
    assert (tmp_path / "ca.pem").read_bytes() == ca_bytes
    assert (tmp_path / "ca-key.pem").read_bytes() == key_bytes
    ca = _cert(tmp_path / "ca.pem")
    for name in ("coordinator", "node-a", "node-b"):
        _cert(tmp_path / f"{name}.pem").verify_directly_issued_by(ca)


def test_cert_from_another_ca_does_not_verify(tmp_path):
    from cryptography.exceptions import InvalidSignature

    make_certs(tmp_path / "a", "tiny", ["node-0"])  # same swarm id: same CA name, other key
    make_certs(tmp_path / "b", "tiny", ["node-0"])
    with pytest.raises(InvalidSignature):
        _cert(tmp_path / "b" / "node-0.pem").verify_directly_issued_by(
            _cert(tmp_path / "a" / "ca.pem")
        )


def test_key_matches_its_certificate(tmp_path):
    from cryptography.hazmat.primitives import serialization

    make_certs(tmp_path, "tiny", ["n"])
    key = serialization.load_pem_private_key((tmp_path / "n-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert (
        key.public_key().public_numbers() == _cert(tmp_path / "n.pem").public_key().public_numbers()
    )


def test_existing_cert_is_not_overwritten_without_force(tmp_path):
    make_certs(tmp_path, "tiny", ["n"])
    before = (tmp_path / "n.pem").read_bytes()
    with pytest.raises(ValueError, match="--force"):
        make_certs(tmp_path, "tiny", ["n"])
    assert (tmp_path / "n.pem").read_bytes() == before
    make_certs(tmp_path, "tiny", ["n"], force=True)
    assert (tmp_path / "n.pem").read_bytes() != before


@pytest.mark.parametrize("names", [["../evil"], ["ca"], ["a", "a"], [""]])
def test_bad_names_are_refused(tmp_path, names):
    with pytest.raises(ValueError):
        make_certs(tmp_path, "tiny", names)


def test_half_a_ca_is_refused(tmp_path):
    make_certs(tmp_path, "tiny", ["n"])
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(ValueError, match="only one of"):
        make_certs(tmp_path, "tiny", ["m"])


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--swarm", "s", "--nodes", "0"]) == 2
    assert "--nodes" in capsys.readouterr().err
