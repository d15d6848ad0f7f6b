"""``medunic client start``: a hospital's site daemon, a Flower SuperNode with its node config.

It validates the site's data first (``medunic client check``) and refuses to start when
too much of it is bad; then it runs Flower's SuperNode through client.supernode (which
runs only the apps this site allows: the medunic installed here, plus ``--allow-app``
hashes) against the coordinator with TLS (the federation's CA) and the site's own
SuperNode key (``medunic client keygen``), and with the node config the ClientApp reads:
``site``, ``lang``, ``data-path``, ``cache-dir``, ``tokenizer`` and the site's privacy
budget ``dp-max-epsilon`` / ``dp-max-delta`` (medunic_core.privacy). The SuperNode's own
Runtime API listens on loopback only. Flower's telemetry, update check and runtime
dependency installation are off.

``medunic client app-hash`` prints the hash of the installed app, for the operator to
compare with the coordinator's (``medunic server run`` prints it too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from client.check import check_site, refusals
from client.supernode import check_sha256, installed_app_hash
from medunic_core.cli import subprocess_env
from medunic_core.constants import LANGUAGES
from medunic_core.errors import ConfigError, SiteDataError


def node_config(site: str, lang: str, data: Path, cache: Path, tokenizer: Path,
                dp_max_epsilon: Optional[float] = None, dp_max_delta: Optional[float] = None) -> str:
    """The ``--node-config`` string (TOML values: strings quoted, numbers not)."""
    values = {"site": site, "lang": lang, "data-path": str(data.resolve()), "cache-dir": str(cache.resolve()),
              "tokenizer": str(tokenizer.resolve())}
    for k, v in values.items():
        if "'" in v:
            raise ConfigError(f"{k} {v!r} contains a quote; use a path without one")
    budget = {"dp-max-epsilon": dp_max_epsilon, "dp-max-delta": dp_max_delta}
    for k, b in budget.items():
        if b is not None and not b > 0:
            raise ConfigError(f"--{k} {b}: a privacy budget must be > 0")
    return " ".join([*(f"{k}='{v}'" for k, v in values.items()),
                     *(f"{k}={float(b)!r}" for k, b in budget.items() if b is not None)])


def supernode_command(superlink: str, site: str, lang: str, data: Path, cache: Path, tokenizer: Path,
                      ca: Optional[Path], key: Optional[Path], port: int, insecure: bool,
                      dp_max_epsilon: Optional[float] = None, dp_max_delta: Optional[float] = None,
                      allow_apps: Sequence[str] = ()) -> list[str]:
    command = [sys.executable, "-m", "client.supernode", *(f"--allow-app={check_sha256(h)}" for h in allow_apps),
               "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
               "--node-config", node_config(site, lang, data, cache, tokenizer, dp_max_epsilon, dp_max_delta)]
    if insecure:
        return command + ["--insecure"]
    if ca is None or key is None or not ca.is_file() or not key.is_file():
        raise ConfigError("TLS needs --ca (the federation's ca.crt) and --key (this site's private key); "
                          "plain HTTP only with --insecure")
    return command + ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def start(args: argparse.Namespace) -> subprocess.Popen:
    """Check the site's data, then start its SuperNode (returns the process)."""
    report = check_site(args.data, args.language, args.site, progress=False)
    print(report.summary())
    refused = refusals(report, args.max_bad)
    if refused:
        raise SiteDataError(f"site '{args.site}' refused to start: {'; '.join(refused)}; see the list above")
    command = supernode_command(args.superlink, args.site, args.language, Path(args.data), Path(args.cache),
                                Path(args.tokenizer), Path(args.ca) if args.ca else None,
                                Path(args.key) if args.key else None, args.port, args.insecure,
                                args.dp_max_epsilon, args.dp_max_delta, args.allow_app)
    if not args.log:
        return subprocess.Popen(command, env=subprocess_env())
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "ab") as log:
        return subprocess.Popen(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def add_start_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("start", help="validate the site, then run its SuperNode")
    p.add_argument("--superlink", required=True, help="coordinator address HOST:PORT")
    p.add_argument("--site", required=True, help="this site's name")
    p.add_argument("--language", required=True, choices=LANGUAGES)
    p.add_argument("--data", required=True, help="the site's manifest")
    p.add_argument("--tokenizer", required=True, help="the federation's tokenizer folder (a local copy)")
    p.add_argument("--cache", default="cache/site", help="preprocessed-image cache (default: %(default)s)")
    p.add_argument("--ca", default=None, help="the federation's CA certificate (ca.crt)")
    p.add_argument("--key", default=None, help="this site's SuperNode private key")
    p.add_argument("--port", type=int, default=9094, help="local port of the SuperNode (default: %(default)s)")
    p.add_argument("--max-bad", type=float, default=0.05)
    p.add_argument("--dp-max-epsilon", type=float, default=None,
                   help="this site's privacy budget: train only in runs with update-level DP, and stop releasing "
                        "updates before epsilon over all releases of its data passes this")
    p.add_argument("--dp-max-delta", type=float, default=None, help="largest delta this site accepts")
    p.add_argument("--allow-app", action="append", default=[], metavar="SHA256",
                   help="also run the app with this FAB sha256 (repeat); by default only the medunic installed "
                        "here runs")
    p.add_argument("--log", default=None, help="append the daemon's output to this file (default: the console)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")
    p.set_defaults(func=lambda a: start(a).wait())


def add_app_hash_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("app-hash", help="print the FAB sha256 of the medunic app installed here (what "
                                               "the site daemon runs)")
    p.set_defaults(func=lambda a: print(installed_app_hash()) or 0)
