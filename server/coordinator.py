"""``medunic server ...``: what a coordinator runs, on top of Flower's deployment engine.

- ``start``: a SuperLink with TLS and SuperNode authentication on by default (plain HTTP
  only with ``--insecure``), its state in a database file so that a restart keeps the
  registered sites, and the ``$FLWR_HOME`` connection the other commands use;
- ``register``: add a site's public key (only registered sites may connect);
- ``run``: start a federated run of this app and stream its progress; a run folder with a
  server checkpoint resumes after its last completed round (``fed.resume``).

Flower's telemetry, update check and runtime dependency installation are off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from medunic_core.cli import subprocess_env
from medunic_core.errors import ConfigError, MedunicError

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "medunic"


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").resolve()


def coordinator_env() -> dict[str, str]:
    return subprocess_env(FLWR_HOME=str(flwr_home()))


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def write_connection(address: str, ca: Optional[Path], insecure: bool, home: Optional[Path] = None,
                     name: str = CONNECTION) -> Path:
    """``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``: where ``flwr`` finds the SuperLink."""
    home = home or flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    trust = "insecure = true" if insecure else f'root-certificates = "{Path(ca).resolve()}"'  # type: ignore[arg-type]
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{trust}\n')
    return path


def superlink_command(certs: Optional[Path], host: str, port: int, state: Path, insecure: bool) -> list[str]:
    command = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--database", str(state / "superlink.db"),
               "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    if certs is None:
        raise ConfigError("TLS needs --certs (made by `medunic certs`); plain HTTP only with --insecure")
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (certs / name).is_file():
            raise ConfigError(f"{certs / name} is missing; create it with `medunic certs --host ...`")
    return command + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                      "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]


def start(certs: Optional[str], host: str, port: int, state: str, insecure: bool, dial: Optional[str]) -> subprocess.Popen:
    """Start the SuperLink (returns its process) and write the connection for ``flwr``."""
    state_dir = Path(state)
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_dir = Path(certs) if certs else None
    command = superlink_command(cert_dir, host, port, state_dir, insecure)
    log = (state_dir / "superlink.log").open("ab")
    proc = subprocess.Popen(command, env=coordinator_env(), stdout=log, stderr=subprocess.STDOUT)
    address = f"{dial or ('127.0.0.1' if host in ('0.0.0.0', '::') else host)}:{port}"
    write_connection(address, cert_dir / "ca.crt" if cert_dir else None, insecure)
    (state_dir / "superlink.pid").write_text(str(proc.pid))
    return proc


def register_site(public_key: str, name: str) -> None:
    out = subprocess.run([_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                          "--name", name], env=coordinator_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise MedunicError(f"registering {public_key} failed:\n{out.stdout}{out.stderr}")
    print(out.stdout.strip())


def run(run_config: dict[str, str], timeout: Optional[float] = None, log_file: Optional[Path] = None) -> int:
    """``flwr run <app> medunic --stream`` with a run config file; returns flwr's exit code."""
    home = flwr_home()
    cfg_file = home / f"run-config-{int(time.time() * 1000)}.toml"
    cfg_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    command = [_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(cfg_file)]
    with (log_file.open("w") if log_file else open(os.devnull, "w")) as log:
        proc = subprocess.Popen(command, env=coordinator_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=APP_DIR)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            print(line, end="", flush=True)
        return proc.wait(timeout=timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("server", help="coordinator: SuperLink with TLS + site auth, register sites, run")
    commands = parser.add_subparsers(dest="server_command", required=True)
    p = commands.add_parser("start", help="start the SuperLink (TLS + SuperNode authentication by default)")
    p.add_argument("--certs", default="certs", help="folder made by `medunic certs` (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--dial", default=None, help="host name in the certificate to reach it by (default: the host)")
    p.add_argument("--state", default="coordinator", help="SuperLink database and logs (default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no site authentication (testing only)")
    p.set_defaults(func=_start)
    p = commands.add_parser("register", help="allow a site's SuperNode key")
    p.add_argument("public_key", help="the site's OpenSSH public key (certs/sites/NAME.pub)")
    p.add_argument("--name", required=True, help="site name")
    p.set_defaults(func=lambda a: register_site(a.public_key, a.name) or 0)
    p = commands.add_parser("run", help="start a federated run on the SuperLink and stream it")
    p.add_argument("--stage", choices=("vocab", "mlm", "vlp"), default="vlp",
                   help="vocab: build the tokenizer from the sites' word counts; mlm: post-train the text "
                        "encoder; vlp: image-text pre-training (default: %(default)s)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer folder, sites hold a copy (mlm, vlp)")
    p.add_argument("--sites", type=int, required=True, help="number of sites in the federation")
    p.add_argument("--min-sites", type=int, default=0,
                   help="fewest sites a round may go on with after fed.site_wait (default: all)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_run)


def _start(args: argparse.Namespace) -> int:
    proc = start(args.certs, args.host, args.port, args.state, args.insecure, args.dial)
    print(f"SuperLink pid {proc.pid} on {args.host}:{args.port} ({'INSECURE' if args.insecure else 'TLS + site auth'}); "
          f"logs in {Path(args.state) / 'superlink.log'}; Ctrl-C stops it")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _run(args: argparse.Namespace) -> int:
    if args.stage != "vocab" and not args.tokenizer:
        raise ConfigError(f"--stage {args.stage} needs --tokenizer (the folder the vocab stage wrote)")
    overrides = [*args.overrides, f"fed.expected_sites={args.sites}", f"fed.min_sites={args.min_sites}"]
    return run({"stage": args.stage, "preset": args.preset, "overrides": json.dumps(overrides), "sites": "",
                "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else ""})
