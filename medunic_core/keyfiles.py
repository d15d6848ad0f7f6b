"""Writing key material: private files 0600 in a 0700 folder, never overwritten by accident.

Used by the coordinator's ``medunic certs`` (CA, SuperLink certificate) and by a site's
``medunic client keygen`` (its SuperNode key pair), so both follow one rule.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medunic_core.errors import ConfigError


def write_key_file(path: Path, data: bytes, private: bool, force: bool = False) -> Path:
    """Write ``data`` to ``path``: 0600 in a 0700 folder when ``private``, else 0644.
    An existing file is refused unless ``force``."""
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; refusing to overwrite key material without --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)
    return path


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 of an OpenSSH public key's base64 part: what a site and the coordinator
    compare (by phone, say) before the key is registered."""
    parts = public_key.split()
    return hashlib.sha256(parts[1] if len(parts) > 1 else public_key).hexdigest()
