"""A hospital's site daemon: ``medunic client init | start | app-hash``.

``start`` validates the site's data (``medunic client check``) and refuses to start when too
much of it is bad or when its privacy ledger was lost; then it runs Flower's SuperNode
through client.supernode (which runs only the apps this site allows: the medunic installed
here, plus ``allow_apps`` hashes) against the coordinator with TLS (the federation's CA)
and the site's own key (``medunic client keygen``), and with the node config the ClientApp
reads: ``site``, ``lang``, ``data-path``, ``cache-dir``, ``state-dir``, ``tokenizer``,
``text-encoder``, the privacy budget ``dp-max-epsilon`` / ``dp-max-delta`` and the release
floors ``min-pairs`` / ``min-df`` (client.app: what the site never sends). The SuperNode's
own Runtime API listens on loopback only; Flower's telemetry, update check and runtime
dependency installation are off; its log also goes to ``<state>/logs/site.log`` (rotated
daily, 14 kept).

Its settings (:class:`SiteSettings`) come from a site config file (``--config site.toml``,
written by ``medunic client init`` with a systemd unit) or from flags. ``app-hash`` prints
the hash of the installed app, for the operator to compare with the coordinator's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from client.check import check_site, refusals
from client.site import SiteState
from client.supernode import check_sha256, installed_app_hash
from medunic_core.cli import subprocess_env
from medunic_core.data.language import site_language, site_language_arg
from medunic_core.errors import ConfigError, SiteDataError
from medunic_core.constants import DEFAULT_MIN_DF, DEFAULT_MIN_PAIRS
from medunic_core.service import ServiceSettings, systemd_unit, write_files


def default_state(site: str) -> Path:
    """``$XDG_STATE_HOME/medunic/<site>`` (``~/.local/state/medunic/<site>``): apart from caches."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "medunic" / site


@dataclass
class SiteSettings(ServiceSettings):
    """Everything a site daemon needs: a site config file's keys, or the flags of ``start``."""

    site: str
    language: str
    data: str  # the site's manifest
    superlink: str  # the coordinator, HOST:PORT
    tokenizer: str  # the federation's tokenizer folder (a local copy)
    ca: str = ""  # the federation's ca.crt
    key: str = ""  # this site's private key (medunic client keygen)
    state: str = ""  # privacy ledger, audit log, Flower's folder, logs (default: default_state(site))
    cache: str = ""  # preprocessed images (default: <state>/cache)
    text_encoder: str = ""  # the federation's MLM text encoder folder, when a run starts from it
    port: int = 9094  # the SuperNode's local Runtime API (127.0.0.1)
    max_bad: float = 0.05
    dp_max_epsilon: Optional[float] = None
    dp_max_delta: Optional[float] = None
    min_pairs: int = DEFAULT_MIN_PAIRS  # the fewest distinct pairs behind anything the site sends
    min_df: int = DEFAULT_MIN_DF  # the fewest reports a word it sends must be found in
    allow_apps: list[str] = field(default_factory=list)  # extra allowed FAB sha256
    insecure: bool = False

    HEADER = ("medunic site config: medunic client start --config FILE\n"
              "keys are the flags of `medunic client start --help`; docs/deployment.md explains each")

    def __post_init__(self) -> None:
        self.language = site_language(self.language)
        for name in ("dp_max_epsilon", "dp_max_delta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name.replace('_', '-')} {value}: a privacy budget must be > 0")
        for name in ("min_pairs", "min_df"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} {value!r}: a whole number >= 1")
        self.allow_apps = [check_sha256(h) for h in self.allow_apps]
        self.state = self.state or str(default_state(self.site))
        self.cache = self.cache or str(Path(self.state) / "cache")

    def node_config(self) -> str:
        """The ``--node-config`` string (TOML values: strings quoted, numbers not)."""
        values = {"site": self.site, "lang": self.language, "data-path": self.data, "cache-dir": self.cache,
                  "state-dir": self.state, "tokenizer": self.tokenizer, "text-encoder": self.text_encoder}
        values = {k: str(Path(v).resolve()) if k != "site" and k != "lang" and v else v
                  for k, v in values.items() if v}
        for k, v in values.items():
            if "'" in v:
                raise ConfigError(f"{k} {v!r} contains a quote; use a path without one")
        budget = {"dp-max-epsilon": self.dp_max_epsilon, "dp-max-delta": self.dp_max_delta}
        return " ".join([*(f"{k}='{v}'" for k, v in values.items()),
                         *(f"{k}={float(b)!r}" for k, b in budget.items() if b is not None),
                         f"min-pairs={self.min_pairs}", f"min-df={self.min_df}"])

    def supernode_command(self) -> list[str]:
        command = [sys.executable, "-m", "client.supernode", *(f"--allow-app={h}" for h in self.allow_apps),
                   f"--log-file={Path(self.state).resolve() / 'logs' / 'site.log'}",
                   "--superlink", self.superlink, "--host", "127.0.0.1", "--port", str(self.port),
                   "--node-config", self.node_config()]
        if self.insecure:
            return command + ["--insecure"]
        if not self.ca or not self.key or not Path(self.ca).is_file() or not Path(self.key).is_file():
            raise ConfigError("TLS needs the federation's ca.crt (ca) and this site's private key (key); plain HTTP "
                              "only with insecure")
        return command + ["--root-certificates", str(Path(self.ca).resolve()), "--auth-supernode-private-key",
                          str(Path(self.key).resolve())]


def artefacts(settings: SiteSettings) -> str:
    """The hashes of what the site holds from the coordinator, for the operator to compare with
    the coordinator's (every run checks them again and refuses a mismatch)."""
    from medunic_core.export import folder_sha256
    from medunic_core.vocab import vocab_sha256

    if not Path(settings.tokenizer).is_dir():
        raise ConfigError(f"tokenizer {settings.tokenizer} is not a folder: copy the federation's tokenizer there")
    lines = [f"tokenizer {settings.tokenizer}: vocabulary sha256 {vocab_sha256(settings.tokenizer)}"]
    if settings.text_encoder:
        try:
            lines.append(f"text encoder {settings.text_encoder}: sha256 {folder_sha256(settings.text_encoder)}")
        except FileNotFoundError as exc:
            raise ConfigError(f"text encoder {exc}: copy the federation's MLM text encoder there") from None
    return "\n".join(lines)


def start(settings: SiteSettings, log: Optional[str] = None, reset_privacy_ledger: bool = False) -> subprocess.Popen:
    """Check the site's data and state, then start its SuperNode (returns the process)."""
    report = check_site(settings.data, settings.language, settings.site, progress=False)
    print(report.summary())
    refused = refusals(report, settings.max_bad)
    if refused:
        raise SiteDataError(f"site '{settings.site}' refused to start: {'; '.join(refused)}; see the list above")
    state = SiteState(Path(settings.state))
    if reset_privacy_ledger:
        state.reset_ledger()
    state.check_ledger()
    print(artefacts(settings))
    command = settings.supernode_command()
    env = subprocess_env(FLWR_HOME=str((Path(settings.state) / "flwr").resolve()))
    if not log:
        return subprocess.Popen(command, env=env)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def init(settings: SiteSettings, out: Path, unit: Optional[Path], user: str, force: bool) -> list[Path]:
    """Write the site config file and, optionally, a systemd unit for a non-root service user."""
    files = {out: settings.to_toml()}
    if unit is not None:
        log = Path(settings.state).resolve() / "logs" / "daemon.out"
        files[unit] = systemd_unit(f"medunic site daemon ({settings.site})", user,
                                   f"client start --config {out.resolve()} --log {log}", [Path(settings.state)])
    return write_files(files, force)


def _settings_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--site", required=required, help="this site's name")
    p.add_argument("--language", required=required, type=site_language_arg,
                   help="the site's language community (en, es, or en+es for a site whose reports come in both)")
    p.add_argument("--data", required=required, help="the site's manifest")
    p.add_argument("--superlink", required=required, help="coordinator address HOST:PORT")
    p.add_argument("--tokenizer", required=required, help="the federation's tokenizer folder (a local copy)")
    p.add_argument("--ca", default="", help="the federation's CA certificate (ca.crt)")
    p.add_argument("--key", default="", help="this site's SuperNode private key")
    p.add_argument("--state", default="", help="privacy ledger, audit log, logs (default: ~/.local/state/medunic/SITE)")
    p.add_argument("--cache", default="", help="preprocessed-image cache (default: STATE/cache)")
    p.add_argument("--text-encoder", default="", help="the federation's MLM text encoder folder (a local copy)")
    p.add_argument("--port", type=int, default=9094, help="local port of the SuperNode (default: %(default)s)")
    p.add_argument("--max-bad", type=float, default=0.05)
    p.add_argument("--dp-max-epsilon", type=float, default=None,
                   help="this site's privacy budget: train only in runs with update-level DP, and stop releasing "
                        "updates before epsilon over all releases of its data passes this")
    p.add_argument("--dp-max-delta", type=float, default=None, help="largest delta this site accepts")
    p.add_argument("--min-pairs", type=int, default=DEFAULT_MIN_PAIRS,
                   help="send nothing drawn from fewer distinct pairs: refuse smaller rounds, keep a language's "
                        "alignment sums drawn from fewer (default: %(default)s)")
    p.add_argument("--min-df", type=int, default=DEFAULT_MIN_DF,
                   help="send no word found in fewer of the site's reports: refuse a vocabulary stage with a lower "
                        "vocab.min_df (default: %(default)s)")
    p.add_argument("--allow-app", dest="allow_apps", action="append", default=[], metavar="SHA256",
                   help="also run the app with this FAB sha256 (repeat); by default only the medunic installed here")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")


def _settings(args: argparse.Namespace) -> SiteSettings:
    if getattr(args, "config", None):
        return SiteSettings.load(args.config)
    missing = [k for k in ("site", "language", "data", "superlink", "tokenizer") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"give --config site.toml, or {', '.join('--' + m for m in missing)}")
    return SiteSettings.from_args(args)


def add_start_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("start", help="validate the site, then run its SuperNode")
    p.add_argument("--config", default=None, help="a site config file (medunic client init) instead of the flags")
    _settings_args(p, required=False)
    p.add_argument("--log", default=None, help="append the daemon's output to this file (default: the console)")
    p.add_argument("--reset-privacy-ledger", action="store_true",
                   help="accept that the privacy ledger is lost: its releases are no longer counted")
    p.set_defaults(func=lambda a: start(_settings(a), a.log, a.reset_privacy_ledger).wait())


def add_init_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write a site config file (and a systemd unit) for the site daemon")
    _settings_args(p, required=True)
    p.add_argument("--out", default="site.toml", help="the site config file (default: %(default)s)")
    p.add_argument("--systemd-unit", default=None, help="also write a systemd unit here (e.g. medunic-site.service)")
    p.add_argument("--user", default="medunic", help="the service user of the unit (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_init)


def add_app_hash_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("app-hash", help="print the FAB sha256 of the medunic app installed here (what "
                                               "the site daemon runs)")
    p.set_defaults(func=lambda a: print(installed_app_hash()) or 0)


def _init(args: argparse.Namespace) -> int:
    unit = Path(args.systemd_unit) if args.systemd_unit else None
    for path in init(_settings(args), Path(args.out), unit, args.user, args.force):
        print(f"wrote {path}")
    return 0

