"""``medunic client start``: a hospital's site daemon, a Flower SuperNode with its node config.

It validates the site's data first (``medunic client check``) and refuses to start when
too much of it is bad; then it runs ``flower-supernode`` against the coordinator with
TLS (the federation's CA) and the site's SuperNode key, and with the node config the
ClientApp reads: ``site``, ``lang``, ``data-path``, ``cache-dir``, ``tokenizer`` and the
site's privacy budget ``dp-max-epsilon`` / ``dp-max-delta`` (medunic_core.privacy). Flower's
telemetry, update check and runtime dependency installation are off.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional

from client.check import check_site, refusals
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
                      dp_max_epsilon: Optional[float] = None, dp_max_delta: Optional[float] = None) -> list[str]:
    command = [str(Path(sys.executable).with_name("flower-supernode")), "--superlink", superlink, "--port", str(port),
               "--node-config", node_config(site, lang, data, cache, tokenizer, dp_max_epsilon, dp_max_delta)]
    if insecure:
        return command + ["--insecure"]
    if ca is None or key is None or not ca.is_file() or not key.is_file():
        raise ConfigError("TLS needs --ca (the federation's ca.crt) and --key (this site's private key); "
                          "plain HTTP only with --insecure")
    return command + ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def start(args: argparse.Namespace) -> subprocess.Popen:
    report = check_site(args.data, args.language, args.site, progress=False)
    print(report.summary())
    refused = refusals(report, args.max_bad)
    if refused:
        raise SiteDataError(f"site '{args.site}' refused to start: {'; '.join(refused)}; see the list above")
    command = supernode_command(args.superlink, args.site, args.language, Path(args.data), Path(args.cache),
                                Path(args.tokenizer), Path(args.ca) if args.ca else None,
                                Path(args.key) if args.key else None, args.port, args.insecure,
                                args.dp_max_epsilon, args.dp_max_delta)
    return subprocess.Popen(command, env=subprocess_env())


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
    p.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")
    p.set_defaults(func=lambda a: start(a).wait())
