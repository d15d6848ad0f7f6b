"""`medunic server start`'s side effects on the operator's machine: the Flower connection it
writes, and a loud failure when the SuperLink cannot answer over TLS."""

from __future__ import annotations

import datetime as dt
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medunic_core.cli import main, subprocess_env
from medunic_core.errors import ConfigError, MedunicError
from server import coordinator
from server.certs import create_ca

from tests.deployment.loopback import free_port


def test_the_connection_is_added_or_updated_and_nothing_else_changes(tmp_path):
    home = tmp_path / "flwr"
    home.mkdir()
    before = ('# my own SuperLinks\n[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "lab.example.org:9093"\n'
              'root-certificates = "/etc/lab/ca.crt"\n')
    (home / "config.toml").write_text(before)
    coordinator.write_connection("127.0.0.1:9093", tmp_path / "ca.crt", False, home=home)
    text = (home / "config.toml").read_text()
    assert text.startswith(before)  # the user's entries and comments, byte for byte
    parsed = tomllib.loads(text)["superlink"]
    assert parsed["default"] == "lab" and parsed["lab"]["address"] == "lab.example.org:9093"
    assert parsed["medunic"] == {"address": "127.0.0.1:9093", "root-certificates": str((tmp_path / "ca.crt").resolve())}
    coordinator.write_connection("127.0.0.1:7000", None, True, home=home)  # updated in place, not added twice
    again = (home / "config.toml").read_text()
    assert again.count("[superlink.medunic]") == 1 and again.startswith(before)
    assert tomllib.loads(again)["superlink"]["medunic"] == {"address": "127.0.0.1:7000", "insecure": True}
    (home / "config.toml").write_text("[superlink\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        coordinator.write_connection("127.0.0.1:9093", None, True, home=home)
    assert (home / "config.toml").read_text() == "[superlink\n"  # a broken file is never overwritten


def test_a_run_status_flower_cannot_give_is_unknown_with_flowers_reason(tmp_path):
    env = subprocess_env(FLWR_HOME=str(tmp_path / "flwr"))
    status, details = coordinator.run_status("nowhere", "123", env)
    assert status.startswith("unknown (flwr ls:") and "'nowhere' not found" in status and details == ""


@pytest.mark.slow
def test_server_start_fails_loudly_when_its_certificate_does_not_cover_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    certs = tmp_path / "certs"
    ca, ca_key = create_ca(certs)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("coordinator.example.org")]), critical=False)
            .sign(ca_key, hashes.SHA384()))  # an older certificate: the guide's name only
    (certs / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with pytest.raises(MedunicError, match="does not verify for 127.0.0.1"):
        coordinator.start(coordinator.CoordinatorSettings(str(certs), "127.0.0.1", free_port(), free_port(),
                                                        str(tmp_path / "state")))
    assert not (tmp_path / "flwr" / "config.toml").exists()  # no connection to a SuperLink that does not work


def test_server_init_writes_a_config_that_start_and_the_operator_commands_read(tmp_path, capsys):
    config, unit = tmp_path / "coordinator.toml", tmp_path / "medunic-server.service"
    assert main(["server", "init", "--certs", str(tmp_path / "certs"), "--host", "10.0.0.5", "--port", "9443",
                 "--state", str(tmp_path / "state"), "--out", str(config), "--systemd-unit", str(unit)]) == 0
    settings = coordinator.CoordinatorSettings.load(config)
    assert (settings.host, settings.port, settings.control_port) == ("10.0.0.5", 9443, 9093)
    text = unit.read_text()
    assert f"server start --config {config.resolve()}" in text and "User=medunic" in text
    assert f"ReadWritePaths={(tmp_path / 'state').resolve()}" in text
    # the operator's commands find the state folder through the same file
    assert main(["server", "status", "--config", str(config)]) == 2
    assert "no SuperLink was started" in capsys.readouterr().err
    config.write_text(config.read_text().replace("9443", "9093"))
    with pytest.raises(ConfigError, match="port and control-port are both 9093"):
        coordinator.CoordinatorSettings.load(config)
    assert main(["server", "init", "--user", "root", "--out", str(tmp_path / "b.toml"),
                 "--systemd-unit", str(tmp_path / "b.service")]) == 2  # never a root service


def test_server_run_refuses_a_bad_setting_before_it_starts_a_run(tmp_path, capsys):
    """The settings are checked where the coordinator types them, not minutes later in the ServerApp."""
    state = ["--state", str(tmp_path / "state")]
    assert main(["server", "run", "--stage", "vocab", "--sites", "2", *state, "fed.strategy=fedmedian"]) == 2
    assert "outvotes a malicious site only in rounds of at least 3 sites" in capsys.readouterr().err
    assert main(["server", "run", "--stage", "vocab", "--sites", "2", *state, "fed.strategy=fedsgd"]) == 2
    assert "bad value for 'fed.strategy'" in capsys.readouterr().err
    # a good setting gets as far as the next check: the registry of a started SuperLink
    assert main(["server", "run", "--stage", "vocab", "--sites", "3", *state, "fed.strategy=fedmedian"]) == 2
    assert "register the sites first" in capsys.readouterr().err
