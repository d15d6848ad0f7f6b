"""The ``medunic`` command: sub-commands are plugins found through entry points.

Each entry of the ``medunic.commands`` group in pyproject.toml names a function
``register(subparsers)`` that adds one sub-command whose parser sets ``func``. This keeps
``medunic_core`` free of imports of the packages built on it (server, client, simulation).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Optional, Sequence

from medunic_core import __version__
from medunic_core.errors import MedunicError

# Offline and quiet by default: hospitals and CI have no hub access and no wandb login.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for the tools we start (Flower's SuperLink/SuperNode/flwr): offline and
    quiet, with this environment's scripts first on PATH, because those tools start their
    helpers (flower-superexec, ...) by name."""
    env = {**os.environ, **OFFLINE_ENV, **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def add_config_args(parser: argparse.ArgumentParser, preset: Optional[str] = "tiny") -> None:
    """What every config-driven sub-command shares: a preset or config file, key=value
    overrides, and a switch for progress bars (off for logs and CI)."""
    parser.add_argument("--preset", default=preset, help="configs/presets/NAME.yaml (default: %(default)s)")
    parser.add_argument("--config", default=None, help="a saved config YAML instead of a preset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` only that sub-command's plugin is imported (fast start)."""
    parser = argparse.ArgumentParser(prog="medunic", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"medunic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sorted(entry_points(group="medunic.commands"), key=lambda e: e.name)
    chosen = [ep for ep in plugins if ep.name == command] or plugins
    for ep in chosen:
        register: Callable[[argparse._SubParsersAction], None] = ep.load()
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    # key=value overrides may stand anywhere, also after options (argparse alone would
    # refuse positionals split by an option).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MedunicError as exc:
        print(f"medunic {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
