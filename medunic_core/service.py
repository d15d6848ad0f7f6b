"""Running medunic as a service: a settings file (TOML) and a systemd unit.

The site daemon (``medunic client init``) and the coordinator (``medunic server init``) each
describe their settings as a dataclass deriving from :class:`ServiceSettings`; the config file
holds the same keys as the command's flags (``--dp-max-epsilon`` is ``dp-max-epsilon``), so
there is one list of settings per service and one way to read and write it.
"""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, TypeVar

from medunic_core.errors import ConfigError

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings:
    """Mixin for a settings dataclass that round-trips through a TOML file."""

    HEADER = "medunic settings"  # the file's leading comment

    @classmethod
    def load(cls: type[S], path: str | Path) -> S:
        """Read a settings file; unknown keys, wrong types and missing keys name themselves."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable config file ({exc})") from None
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**{known[k]: v for k, v in raw.items()})
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_args(cls: type[S], args: Any) -> S:
        """From parsed command-line flags whose ``dest`` names are the fields' names."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})  # type: ignore[arg-type]

    def to_toml(self) -> str:
        """The settings as a TOML file (unset values left out), after the class's ``HEADER``."""
        lines = [f"# {line}" for line in self.HEADER.splitlines()]
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                lines.append(f"{f.name.replace('_', '-')} = {json.dumps(value)}")  # JSON scalars/lists are TOML
        return "\n".join(lines) + "\n"


SYSTEMD_UNIT = """[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={exec_start}
Restart=on-failure
RestartSec=30
# the service user reads the data; it writes only its state folder
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={writable}
PrivateTmp=true
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
"""


def systemd_unit(description: str, user: str, arguments: str, writable: Iterable[Path]) -> str:
    """A unit that runs ``medunic ARGUMENTS`` (this installation) as the non-root ``user``."""
    if user == "root":
        raise ConfigError("the service user must not be root: create one, e.g. `useradd --system medunic`")
    medunic = Path(sys.executable).with_name("medunic")
    return SYSTEMD_UNIT.format(description=description, user=user, exec_start=f"{medunic} {arguments}",
                               writable=" ".join(str(Path(p).resolve()) for p in writable))


def write_files(files: dict[Path, str], force: bool) -> list[Path]:
    """Write each file, refusing to overwrite any existing one unless ``force``."""
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(map(str, existing))} exists; refusing to overwrite without --force")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
