"""``medunic server ...``: what a coordinator runs, on top of Flower's deployment engine.

- ``start``: a SuperLink (server.superlink) with TLS and SuperNode authentication on by
  default (plain HTTP only with ``--insecure``). Only the Fleet API listens on the public
  ``--host``/``--port``; the Control and Runtime APIs listen on ``127.0.0.1:--control-port``
  for the coordinator's own tools. Its state is a database file, so that a restart keeps
  the registered sites. It returns once the SuperLink answers over TLS, or fails with the
  log lines that say why;
- ``register``: add a site's public key (only registered sites may connect) and record in
  the site registry (``<state>/sites.json``, server.registry) the node id Flower gives it,
  with the site's name and language: the ServerApp checks every reply against it;
- ``run``: start a federated run of this app and stream its progress; a run folder with a
  server checkpoint resumes after its last completed round (``fed.resume``).

Flower's telemetry, update check and runtime dependency installation are off.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from medunic_core.cli import subprocess_env
from medunic_core.constants import APP_DIR, LANGUAGES
from medunic_core.errors import ConfigError, MedunicError
from server.registry import REGISTRY_FILE, SiteRegistry

CONNECTION = "medunic"
HEALTH_WAIT = 60.0  # s: a SuperLink that does not answer over TLS by then has failed


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").resolve()


def coordinator_env() -> dict[str, str]:
    return subprocess_env(FLWR_HOME=str(flwr_home()))


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def write_connection(address: str, ca: Optional[Path], insecure: bool, home: Optional[Path] = None,
                     name: str = CONNECTION) -> Path:
    """Add or update ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml`` (where ``flwr`` finds the
    SuperLink); every other line of the file is kept as it is."""
    home = home or flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    trust = "insecure = true" if insecure else f'root-certificates = "{Path(ca).resolve()}"'  # type: ignore[arg-type]
    entry = f'[superlink.{name}]\naddress = "{address}"\n{trust}\n'
    if not path.exists():
        path.write_text(f'[superlink]\ndefault = "{name}"\n\n{entry}')
        return path
    text = path.read_text()
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix it or move it away") from None
    lines = text.splitlines(keepends=True)
    header = f"[superlink.{name}]"
    starts = [i for i, line in enumerate(lines) if line.strip() == header]
    if not starts:
        text = text + ("" if text.endswith("\n") or not text else "\n") + "\n" + entry
    else:
        begin = starts[0]
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        text = "".join(lines[:begin]) + entry + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    tomllib.loads(text)  # what we wrote must parse
    path.write_text(text)
    return path


def superlink_command(certs: Optional[Path], host: str, port: int, control_port: int, state: Path,
                      insecure: bool) -> list[str]:
    """server.superlink: Fleet API on ``host:port``, every API on ``127.0.0.1:control_port``."""
    if port == control_port:
        raise ConfigError(f"--port and --control-port are both {port}; the control port must be another one")
    command = [sys.executable, "-m", "server.superlink", "--public", f"{host}:{port}", "--host", "127.0.0.1",
               "--port", str(control_port), "--database", str(state / "superlink.db"),
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


def _log_tail(log: Path, since: int = 0, lines: int = 15) -> str:
    """The last ``lines`` lines the SuperLink wrote to ``log`` after byte ``since``."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace").splitlines()
    return "\n".join(f"  {line}" for line in text[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_healthy(proc: subprocess.Popen, port: int, ca: Optional[Path], log: Path, timeout: float = HEALTH_WAIT,
                 since: int = 0) -> None:
    """Return once ``https://127.0.0.1:port/health`` answers (TLS verified with ``ca``); raise
    with the reason and the SuperLink's last log lines if it exits or does not answer."""
    scheme = "http" if ca is None else "https"
    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedunicError(f"the SuperLink exited with code {proc.returncode}; its log ({log}) ends with:\n"
                               f"{_log_tail(log, since)}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", context=context, timeout=3) as r:
                if r.status == 200:
                    return
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                _stop(proc)
                raise MedunicError(
                    f"the SuperLink's certificate does not verify for 127.0.0.1 with {ca}: {reason.verify_message}. "
                    "The coordinator's own tools and the SuperExec dial 127.0.0.1: re-create the server "
                    "certificate with `medunic certs --force --host ...` (it always adds 127.0.0.1 and localhost)"
                ) from None
            last = str(reason)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    _stop(proc)
    raise MedunicError(f"the SuperLink did not answer on 127.0.0.1:{port} within {timeout:.0f} s ({last}); its log "
                       f"({log}) ends with:\n{_log_tail(log, since)}")


def start(certs: Optional[str], host: str, port: int, control_port: int, state: str, insecure: bool,
          health_timeout: float = HEALTH_WAIT) -> subprocess.Popen:
    """Start the SuperLink, write the ``flwr`` connection to its control listener, and return
    the process once it answers over TLS."""
    state_dir = Path(state)
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_dir = Path(certs) if certs else None
    command = superlink_command(cert_dir, host, port, control_port, state_dir, insecure)
    log = state_dir / "superlink.log"
    since = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=coordinator_env(), stdout=out, stderr=subprocess.STDOUT)
    (state_dir / "superlink.pid").write_text(str(proc.pid))
    ca = None if insecure else cert_dir / "ca.crt"  # type: ignore[operator]
    wait_healthy(proc, control_port, ca, log, health_timeout, since)
    write_connection(f"127.0.0.1:{control_port}", ca, insecure)
    return proc


def _json_object(text: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed (after any banner), or {}."""
    try:
        value = json.loads(text[text.index("{"):])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def register_site(public_key: str, name: str, language: str, state: str) -> int:
    """Register a site's public key with the SuperLink and record its node id, name and
    language in the site registry; returns the node id."""
    if language not in LANGUAGES:
        raise ConfigError(f"--language {language!r} is not one of {LANGUAGES}")
    registry = SiteRegistry.load(Path(state) / REGISTRY_FILE)
    key = Path(public_key)
    if not key.is_file():
        raise ConfigError(f"{key} does not exist; the site makes it with `medunic client keygen`")
    registry.check_new(name, key.read_bytes())
    out = subprocess.run([_bin("flwr"), "supernode", "register", str(key.resolve()), CONNECTION, "--name", name,
                          "--format", "json"], env=coordinator_env(), capture_output=True, text=True)
    answer = _json_object(out.stdout)
    if not isinstance(answer.get("node-id"), int):
        detail = str(answer.get("error-message") or out.stdout + out.stderr).strip()
        raise MedunicError(f"registering {public_key} failed: {detail.splitlines()[-1] if detail else out.returncode}")
    node_id = answer["node-id"]
    registry.add(node_id, name, language, key.read_bytes())
    registry.save()
    print(f"site {name} ({language}) registered as node {node_id} in {registry.path}")
    return node_id


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
            log.flush()
            print(line, end="", flush=True)
        return proc.wait(timeout=timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("server", help="coordinator: SuperLink with TLS + site auth, register sites, run")
    commands = parser.add_subparsers(dest="server_command", required=True)
    p = commands.add_parser("start", help="start the SuperLink (TLS + SuperNode authentication by default)")
    p.add_argument("--certs", default="certs", help="folder made by `medunic certs` (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address of the public (Fleet API) listener (default: %(default)s)")
    p.add_argument("--port", type=int, default=9092, help="port the sites dial (default: %(default)s)")
    p.add_argument("--control-port", type=int, default=9093,
                   help="port of the control listener on 127.0.0.1, for this host's tools (default: %(default)s)")
    p.add_argument("--state", default="coordinator", help="SuperLink database, site registry and logs "
                                                          "(default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no site authentication (testing only)")
    p.set_defaults(func=_start)
    p = commands.add_parser("register", help="allow a site's SuperNode key")
    p.add_argument("public_key", help="the site's OpenSSH public key (made by `medunic client keygen`)")
    p.add_argument("--name", required=True, help="site name")
    p.add_argument("--language", required=True, choices=LANGUAGES, help="the site's language community")
    p.add_argument("--state", default="coordinator", help="the SuperLink's --state folder (default: %(default)s)")
    p.set_defaults(func=lambda a: register_site(a.public_key, a.name, a.language, a.state) and 0)
    p = commands.add_parser("run", help="start a federated run on the SuperLink and stream it")
    p.add_argument("--stage", choices=("vocab", "mlm", "vlp"), default="vlp",
                   help="vocab: build the tokenizer from the sites' word counts; mlm: post-train the text "
                        "encoder; vlp: image-text pre-training (default: %(default)s)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer folder, sites hold a copy (mlm, vlp)")
    p.add_argument("--sites", type=int, required=True, help="number of sites in the federation")
    p.add_argument("--min-sites", type=int, default=0,
                   help="fewest sites a round may go on with after fed.site_wait (default: all)")
    p.add_argument("--state", default="coordinator", help="the SuperLink's --state folder, with the site registry "
                                                          "(default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_run)


def _start(args: argparse.Namespace) -> int:
    proc = start(args.certs, args.host, args.port, args.control_port, args.state, args.insecure)
    print(f"SuperLink pid {proc.pid}: sites dial {args.host}:{args.port} "
          f"({'INSECURE' if args.insecure else 'TLS + site auth'}, Fleet API only); control on "
          f"127.0.0.1:{args.control_port}; logs in {Path(args.state) / 'superlink.log'}; Ctrl-C stops it")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _run(args: argparse.Namespace) -> int:
    if args.stage != "vocab" and not args.tokenizer:
        raise ConfigError(f"--stage {args.stage} needs --tokenizer (the folder the vocab stage wrote)")
    registry = Path(args.state) / REGISTRY_FILE
    if not registry.is_file():
        raise ConfigError(f"{registry} does not exist: register the sites first (`medunic server register`), "
                          "or name the SuperLink's folder with --state")
    overrides = [*args.overrides, f"fed.expected_sites={args.sites}", f"fed.min_sites={args.min_sites}"]
    return run({"stage": args.stage, "preset": args.preset, "overrides": json.dumps(overrides), "sites": "",
                "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else "",
                "registry": str(registry.resolve())})
