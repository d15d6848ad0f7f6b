"""``medunic certs``: the coordinator's TLS material.

Writes into one folder:

- ``ca.crt`` / ``ca.key``: a private certificate authority (EC P-384), 10 years;
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, 825 days,
  with a subjectAltName for every host name and IP address the sites dial, plus
  ``127.0.0.1`` and ``localhost``: the coordinator's own tools and the SuperExec reach the
  SuperLink over loopback (server.superlink), also over TLS.

Site keys are not made here: each site makes its own SuperNode key pair (``medunic client
keygen``) and sends only the public key, so the coordinator never holds a site's private key.
Private keys are written 0600 and their folder 0700. Existing files are never overwritten
unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medunic_core.errors import ConfigError
from medunic_core.keyfiles import write_key_file

CURVE = ec.SECP384R1()
CA_DAYS, SERVER_DAYS = 3650, 825
LOOPBACK_NAMES = ("127.0.0.1", "localhost")  # always in the SAN: the control listener is on loopback


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medunic federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IPAddress entries, everything else as DNSName."""
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def create_ca(out: Path, force: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("medunic CA"))
        .issuer_name(_name("medunic CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    write_key_file(out / "ca.key", _pem_key(key), True, force)
    write_key_file(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), False, force)
    return cert, key


def create_server_cert(out: Path, hosts: Sequence[str], ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                       force: bool = False) -> x509.Certificate:
    if not hosts:
        raise ConfigError("the server certificate needs at least one --host (name or IP the sites dial)")
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_key_file(out / "server.key", _pem_key(key), True, force)
    write_key_file(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), False, force)
    return cert


def create_all(out: str | Path, hosts: Sequence[str], force: bool = False, renew: bool = False) -> Path:
    """CA (reused when present and not forced) and a server certificate for ``hosts``.

    ``renew``: keep the CA (the sites' ``ca.crt`` stays valid) and replace only the server
    certificate and key, e.g. before the 825 days run out."""
    out = Path(out)
    have_ca = (out / "ca.crt").exists() and (out / "ca.key").exists()
    if renew and not have_ca:
        raise ConfigError(f"--renew keeps the CA, but {out / 'ca.crt'} or {out / 'ca.key'} is missing")
    if have_ca and (renew or not force):
        ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    else:
        ca, ca_key = create_ca(out, force)
    create_server_cert(out, hosts, ca, ca_key, force or renew)  # type: ignore[arg-type]
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("certs", help="coordinator: CA and SuperLink TLS certificate")
    parser.add_argument("--out", default="certs", help="folder (default: %(default)s)")
    parser.add_argument("--host", action="append", default=[],
                        help="host name or IP the sites dial (repeat; goes into the certificate's SAN, "
                             "with 127.0.0.1 and localhost)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key material, the CA included")
    parser.add_argument("--renew", action="store_true",
                        help="a new server certificate from the existing CA (sites keep their ca.crt)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = create_all(args.out, args.host, args.force, args.renew)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{oct(path.stat().st_mode & 0o777)}  {path}")
    for name in ("ca.crt", "server.pem"):
        cert = x509.load_pem_x509_certificate((out / name).read_bytes())
        print(f"{name} valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0
