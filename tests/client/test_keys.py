"""`medunic client keygen`: a site makes its own SuperNode key pair."""

from __future__ import annotations

import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medunic_core.cli import main


def test_a_site_makes_its_own_key_pair_and_sends_only_the_public_key(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["client", "keygen", "--site", "es-1", "--out", str(keys)]) == 0
    private = serialization.load_ssh_private_key((keys / "es-1").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((keys / "es-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE((keys / "es-1").stat().st_mode) == 0o600 and stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert "es-1.pub" in capsys.readouterr().out
    assert main(["client", "keygen", "--site", "es-1", "--out", str(keys)]) == 2  # never overwritten
    assert main(["client", "keygen", "--site", "../evil", "--out", str(keys)]) == 2
