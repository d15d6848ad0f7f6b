"""`medunic certs`: the coordinator's CA and SuperLink certificate."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509

from medunic_core.cli import main
from medunic_core.errors import ConfigError
from server.certs import create_all


def test_certs_command_writes_a_verifiable_chain_that_covers_loopback(tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "coordinator.example.org", "--host", "10.0.0.5"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the guide's names, plus loopback: the coordinator's own tools and SuperExec dial 127.0.0.1
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (out / "ca.key", out / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not (out / "sites").exists()  # the coordinator never makes (or holds) a site's private key


def test_existing_keys_are_never_overwritten_without_force(tmp_path):
    create_all(tmp_path, ["localhost"])
    before = (tmp_path / "server.key").read_bytes()
    with pytest.raises(ConfigError, match="without --force"):
        create_all(tmp_path, ["localhost"])
    assert (tmp_path / "server.key").read_bytes() == before
    create_all(tmp_path, ["localhost"], force=True)
    assert (tmp_path / "server.key").read_bytes() != before


def test_renew_replaces_the_server_certificate_and_keeps_the_ca_the_sites_hold(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--renew keeps the CA"):
        create_all(tmp_path, ["coordinator.example.org"], renew=True)
    create_all(tmp_path, ["coordinator.example.org"])
    ca_before, server_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "server.pem").read_bytes()
    assert main(["certs", "--out", str(tmp_path), "--host", "coordinator.example.org", "--renew"]) == 0
    assert "server.pem valid until" in capsys.readouterr().out
    assert (tmp_path / "ca.crt").read_bytes() == ca_before and (tmp_path / "server.pem").read_bytes() != server_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()).verify_directly_issued_by(ca)
