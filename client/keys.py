"""``medunic client keygen``: the site makes its own SuperNode key pair.

An EC P-384 key pair in OpenSSH format (what Flower's SuperNode authentication takes). The
private key stays at the site (0600 in a 0700 folder); only the ``.pub`` file goes to the
coordinator, who registers it (``medunic server register``). The coordinator never holds
a site's private key, so it cannot act as the site.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medunic_core.errors import ConfigError
from medunic_core.keyfiles import key_fingerprint, write_key_file


def check_site_name(site: str) -> str:
    if not site or "/" in site or site.startswith(".") or not site.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"'{site}' is not a usable site name (letters, digits, '-' and '_')")
    return site


def create_site_keys(out: Path, site: str, force: bool = False) -> tuple[Path, Path]:
    """``out/<site>`` (private, stays here) and ``out/<site>.pub`` (for the coordinator)."""
    check_site_name(site)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (write_key_file(out / site, private, True, force),
            write_key_file(out / f"{site}.pub", public + f" {site}\n".encode(), False, force))


def add_keygen_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keygen", help="make this site's SuperNode key pair; send only the .pub")
    p.add_argument("--site", required=True, help="this site's name")
    p.add_argument("--out", default="keys", help="folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    private, public = create_site_keys(Path(args.out), args.site, args.force)
    print(f"private key (keep it here, never send it): {private}")
    print(f"public key (send this file to the coordinator): {public}")
    print(f"fingerprint (read it to the coordinator to confirm): SHA256:{key_fingerprint(public.read_bytes())}")
    return 0
