"""`medunic certs`: a CA, a server certificate with the right SAN, OpenSSH site keys."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medunic_core.cli import main
from medunic_core.errors import ConfigError
from server.certs import create_all


def test_certs_command_writes_a_verifiable_chain(tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "coordinator.example.org", "--host", "127.0.0.1",
                 "--site", "en-1", "--site", "es-1"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for site in ("en-1", "es-1"):
        private = serialization.load_ssh_private_key((out / "sites" / site).read_bytes(), password=None)
        public = serialization.load_ssh_public_key((out / "sites" / f"{site}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
    for key in (out / "ca.key", out / "server.key", out / "sites" / "en-1"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((out / "sites").stat().st_mode) == 0o700


def test_existing_keys_are_never_overwritten_without_force(tmp_path):
    create_all(tmp_path, ["localhost"], ["en-1"])
    before = (tmp_path / "sites" / "en-1").read_bytes()
    with pytest.raises(ConfigError, match="without --force"):
        create_all(tmp_path, [], ["en-1"])
    assert (tmp_path / "sites" / "en-1").read_bytes() == before
    create_all(tmp_path, [], ["es-1"])  # a new site reuses the existing CA
    create_all(tmp_path, ["localhost"], ["en-1"], force=True)
    assert (tmp_path / "sites" / "en-1").read_bytes() != before
