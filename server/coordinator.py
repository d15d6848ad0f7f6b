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
  server checkpoint resumes after its last completed round (``fed.resume``);
- ``status``, ``stop``, ``unregister``: what an operator needs without the raw ``flwr`` CLI.

Logs go to ``<state>/logs/``: ``superlink.log`` (Flower's, rotated daily, 14 kept) and
``superlink.out`` (the console).

Flower's telemetry, update check and runtime dependency installation are off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

from medunic_core.cli import subprocess_env
from medunic_core.config import load_config
from medunic_core.constants import APP_DIR
from medunic_core.data.language import site_language, site_language_arg
from medunic_core.errors import ConfigError, MedunicError
from medunic_core.service import ServiceSettings, systemd_unit, write_files
from server.registry import REGISTRY_FILE, SiteRegistry
from server.strategy import round_minimum

CONNECTION = "medunic"
RUN_STARTED = re.compile(r"Successfully started run (\d+)")  # what `flwr run` prints
PID_FILE, SERVER_FILE = "superlink.pid", "superlink.json"  # in the state folder: what `server status|stop` read
HEALTH_WAIT = 60.0  # s: a SuperLink that does not answer over TLS by then has failed


@dataclass
class CoordinatorSettings(ServiceSettings):
    """What ``server start`` needs: a coordinator config file's keys, or its flags."""

    certs: str = "certs"  # made by `medunic certs`
    host: str = "0.0.0.0"  # the public (Fleet API) listener
    port: int = 9092  # the port the sites dial
    control_port: int = 9093  # the control listener on 127.0.0.1
    state: str = "coordinator"  # SuperLink database, site registry, logs
    insecure: bool = False

    HEADER = ("medunic coordinator config: medunic server start --config FILE\n"
              "keys are the flags of `medunic server start --help`; docs/deployment.md explains each")

    def __post_init__(self) -> None:
        for name in ("port", "control_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)} is not a TCP port")
        if self.port == self.control_port:
            raise ConfigError(f"port and control-port are both {self.port}; the control port must be another one")


def flwr_home(state: str | Path) -> Path:
    """Flower's folder for the coordinator's tools: ``$FLWR_HOME`` when set, else ``<state>/flwr``
    (so that the service and the operator's shell find the same ``flwr`` connection)."""
    return Path(os.environ.get("FLWR_HOME") or Path(state) / "flwr").resolve()


def coordinator_env(state: str | Path) -> dict[str, str]:
    return subprocess_env(FLWR_HOME=str(flwr_home(state)))


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def write_connection(address: str, ca: Optional[Path], insecure: bool, home: Path, name: str = CONNECTION) -> Path:
    """Add or update ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml`` (where ``flwr`` finds the
    SuperLink); every other line of the file is kept as it is."""
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
    command = [sys.executable, "-m", "server.superlink", "--public", f"{host}:{port}", "--host", "127.0.0.1",
               "--port", str(control_port), "--database", str(state / "superlink.db"),
               "--disable-runtime-dependency-installation"]
    command += ["--log-file", str(state / "logs" / "superlink.log"), "--log-rotation-interval-hours", "24",
                "--log-rotation-backup-count", "14"]
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


def start(settings: CoordinatorSettings, health_timeout: float = HEALTH_WAIT) -> subprocess.Popen:
    """Start the SuperLink, write the ``flwr`` connection to its control listener, and return
    the process once it answers over TLS."""
    host, port, control_port, insecure = settings.host, settings.port, settings.control_port, settings.insecure
    state_dir = Path(settings.state)
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_dir = Path(settings.certs) if settings.certs else None
    command = superlink_command(cert_dir, host, port, control_port, state_dir, insecure)
    log = state_dir / "logs" / "superlink.out"  # the console; Flower's rotated log is logs/superlink.log
    log.parent.mkdir(parents=True, exist_ok=True)
    since = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=coordinator_env(state_dir), stdout=out, stderr=subprocess.STDOUT)
    (state_dir / PID_FILE).write_text(str(proc.pid))
    ca = None if insecure else cert_dir / "ca.crt"  # type: ignore[operator]
    wait_healthy(proc, control_port, ca, log, health_timeout, since)
    write_connection(f"127.0.0.1:{control_port}", ca, insecure, flwr_home(state_dir))
    (state_dir / SERVER_FILE).write_text(json.dumps({"pid": proc.pid, "public": f"{host}:{port}",
                                                      "control": f"127.0.0.1:{control_port}",
                                                      "ca": str(ca.resolve()) if ca else None}))
    return proc


def _server(state: str) -> dict:
    path = Path(state) / SERVER_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: no SuperLink was started with --state {state}")
    return json.loads(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def status(state: str) -> int:
    """The SuperLink's process and health, and every registered site with its node status."""
    server = _server(state)
    ca = Path(server["ca"]) if server.get("ca") else None
    control = server["control"]
    try:
        context = ssl.create_default_context(cafile=str(ca)) if ca else None
        with urllib.request.urlopen(f"{'https' if ca else 'http'}://{control}/health", context=context, timeout=5) as r:
            health = "healthy" if r.status == 200 else f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as exc:
        health = f"not answering ({getattr(exc, 'reason', exc)})"
    running = _alive(int(server["pid"]))
    print(f"SuperLink pid {server['pid']}: {'running' if running else 'not running'}, {health}; sites dial "
          f"{server['public']}, control {control}")
    nodes = _json_object(subprocess.run([_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                                        env=coordinator_env(state), capture_output=True, text=True).stdout)
    online = {int(n.get("node-id", 0)): n.get("status", "?") for n in nodes.get("nodes", [])}
    for site in sorted(SiteRegistry.load(Path(state) / REGISTRY_FILE).sites.values(), key=lambda s: s.name):
        print(f"  site {site.name} ({site.language}): node {site.node_id}, {online.get(site.node_id, 'unknown')}, "
              f"key SHA256:{site.key_sha256[:16]}...")
    return 0 if running and health == "healthy" else 1


def stop(state: str, timeout: float = 30.0) -> int:
    """Stop the SuperLink started with this state folder (SIGTERM, then SIGKILL)."""
    server = _server(state)
    pid = int(server["pid"])
    if not _alive(pid):
        print(f"SuperLink pid {pid} is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    print(f"SuperLink pid {pid} stopped")
    return 0


def unregister_site(name: str, state: str) -> int:
    """Remove a site: its key can no longer connect, and its replies are refused."""
    registry = SiteRegistry.load(Path(state) / REGISTRY_FILE)
    site = next((s for s in registry.sites.values() if s.name == name), None)
    if site is None:
        raise ConfigError(f"site '{name}' is not in {registry.path}; registered: "
                          f"{sorted(s.name for s in registry.sites.values())}")
    out = subprocess.run([_bin("flwr"), "supernode", "unregister", str(site.node_id), CONNECTION, "--format", "json"],
                         env=coordinator_env(state), capture_output=True, text=True)
    if out.returncode != 0 and "success" not in out.stdout:
        detail = _json_object(out.stdout).get("error-message") or out.stdout + out.stderr
        raise MedunicError(f"unregistering site '{name}' (node {site.node_id}) failed: {str(detail).strip()}")
    del registry.sites[site.node_id]
    registry.save()
    print(f"site {name} (node {site.node_id}) unregistered")
    return 0


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
    language = site_language(language)
    registry = SiteRegistry.load(Path(state) / REGISTRY_FILE)
    key = Path(public_key)
    if not key.is_file():
        raise ConfigError(f"{key} does not exist; the site makes it with `medunic client keygen`")
    registry.check_new(name, key.read_bytes())
    out = subprocess.run([_bin("flwr"), "supernode", "register", str(key.resolve()), CONNECTION, "--name", name,
                          "--format", "json"], env=coordinator_env(state), capture_output=True, text=True)
    answer = _json_object(out.stdout)
    if not isinstance(answer.get("node-id"), int):
        detail = str(answer.get("error-message") or out.stdout + out.stderr).strip()
        raise MedunicError(f"registering {public_key} failed: {detail.splitlines()[-1] if detail else out.returncode}")
    node_id = answer["node-id"]
    registry.add(node_id, name, language, key.read_bytes())
    registry.save()
    print(f"site {name} ({language}) registered as node {node_id} in {registry.path}")
    return node_id


def run(run_config: dict[str, str], state: str, log_file: Optional[Path] = None) -> int:
    """``flwr run <app> medunic --stream`` with a run config file; 0 only if the run completed."""
    cfg_file = flwr_home(state) / f"run-config-{int(time.time() * 1000)}.toml"
    cfg_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    command = [_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(cfg_file)]
    return stream_run(command, CONNECTION, coordinator_env(state), log_file)


def stream_run(command: list[str], connection: str, env: dict[str, str], log_file: Optional[Path],
               echo: Callable[[str], bool] = lambda line: True) -> int:
    """Run ``flwr run ... --stream``, its output to ``log_file`` and the lines ``echo`` picks to
    the console; 0 only if the run finished completed. ``flwr run --stream`` exits 0 however the
    run ended (failed, stopped, or expired before its ServerApp started), so its status is read
    back with ``flwr ls`` and anything else is an error that says why."""
    run_id = None
    with (log_file.open("w") if log_file else open(os.devnull, "w")) as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=APP_DIR)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if echo(line):
                print(line, end="", flush=True)
            started = RUN_STARTED.search(line)
            run_id = run_id or (started.group(1) if started else None)
        rc = proc.wait()
        if rc != 0 or run_id is None:
            return rc or 1
        status, details = run_status(connection, run_id, env)
        if status == "finished:completed":
            return 0
        message = f"medunic: run {run_id} ended {status}" + (f" ({details})" if details else "")
        log.write(message + "\n")
        print(message, flush=True)
        return 1


def run_status(connection: str, run_id: str, env: dict[str, str]) -> tuple[str, str]:
    """A run's status (``finished:completed``, ``finished:failed``, ...) and its details, from ``flwr ls``."""
    try:
        out = subprocess.run([_bin("flwr"), "ls", connection, "--run-id", run_id, "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "unknown (flwr ls did not answer within 120 s)", ""
    answer = _json_object(out.stdout)
    runs = answer.get("runs")
    if not runs or not isinstance(runs[0], dict):
        said = str(answer.get("error-message") or out.stdout + out.stderr).strip().splitlines()
        return f"unknown (flwr ls: {said[-1] if said else f'exit {out.returncode}'})", ""
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details") or "")


def _state_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--state", default=None, help="the SuperLink's state folder (default: coordinator)")
    g.add_argument("--config", default=None, help="the coordinator config file (medunic server init); its state")


def _state(args: argparse.Namespace) -> str:
    if args.config:
        return CoordinatorSettings.load(args.config).state
    return args.state or CoordinatorSettings.state


def _settings_args(p: argparse.ArgumentParser) -> None:
    defaults = CoordinatorSettings()
    p.add_argument("--certs", default=defaults.certs, help="folder made by `medunic certs` (default: %(default)s)")
    p.add_argument("--host", default=defaults.host, help="address of the public (Fleet API) listener "
                                                          "(default: %(default)s)")
    p.add_argument("--port", type=int, default=defaults.port, help="port the sites dial (default: %(default)s)")
    p.add_argument("--control-port", type=int, default=defaults.control_port,
                   help="port of the control listener on 127.0.0.1, for this host's tools (default: %(default)s)")
    p.add_argument("--state", default=defaults.state, help="SuperLink database, site registry and logs "
                                                           "(default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no site authentication (testing only)")


def _settings(args: argparse.Namespace) -> CoordinatorSettings:
    if getattr(args, "config", None):
        return CoordinatorSettings.load(args.config)
    return CoordinatorSettings.from_args(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("server", help="coordinator: SuperLink with TLS + site auth, register sites, run")
    commands = parser.add_subparsers(dest="server_command", required=True)
    p = commands.add_parser("init", help="write a coordinator config file (and a systemd unit)")
    _settings_args(p)
    p.add_argument("--out", default="coordinator.toml", help="the config file (default: %(default)s)")
    p.add_argument("--systemd-unit", default=None, help="also write a systemd unit here (e.g. medunic-server.service)")
    p.add_argument("--user", default="medunic", help="the service user of the unit (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_init)
    p = commands.add_parser("start", help="start the SuperLink (TLS + SuperNode authentication by default)")
    p.add_argument("--config", default=None, help="a coordinator config file (medunic server init) instead of "
                                                   "the flags")
    _settings_args(p)
    p.set_defaults(func=_start)
    p = commands.add_parser("register", help="allow a site's SuperNode key")
    p.add_argument("public_key", help="the site's OpenSSH public key (made by `medunic client keygen`)")
    p.add_argument("--name", required=True, help="site name")
    p.add_argument("--language", required=True, type=site_language_arg,
                   help="the site's language community (en, es, or en+es for a site whose reports come in both)")
    _state_arg(p)
    p.set_defaults(func=lambda a: register_site(a.public_key, a.name, a.language, _state(a)) and 0)
    for name, what in (("status", "the SuperLink's health and the registered sites"),
                       ("stop", "stop the SuperLink")):
        p = commands.add_parser(name, help=what)
        _state_arg(p)
        p.set_defaults(func=(lambda a: status(_state(a))) if name == "status" else (lambda a: stop(_state(a))))
    p = commands.add_parser("unregister", help="remove a site: its key can no longer connect")
    p.add_argument("name", help="the site's name")
    _state_arg(p)
    p.set_defaults(func=lambda a: unregister_site(a.name, _state(a)))
    p = commands.add_parser("run", help="start a federated run on the SuperLink and stream it")
    p.add_argument("--stage", choices=("vocab", "mlm", "vlp"), default="vlp",
                   help="vocab: build the tokenizer from the sites' word counts; mlm: post-train the text "
                        "encoder; vlp: image-text pre-training (default: %(default)s)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer folder, sites hold a copy (mlm, vlp)")
    p.add_argument("--sites", type=int, required=True, help="number of sites in the federation")
    p.add_argument("--min-sites", type=int, default=0,
                   help="fewest sites a round may go on with after fed.site_wait (default: all)")
    _state_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_run)


def _init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    files = {Path(args.out): settings.to_toml()}
    if args.systemd_unit:
        files[Path(args.systemd_unit)] = systemd_unit(
            "medunic coordinator (SuperLink)", args.user, f"server start --config {Path(args.out).resolve()}",
            [Path(settings.state)])
    for path in write_files(files, args.force):
        print(f"wrote {path}")
    return 0


def _start(args: argparse.Namespace) -> int:
    settings = _settings(args)
    proc = start(settings)
    print(f"SuperLink pid {proc.pid}: sites dial {settings.host}:{settings.port} "
          f"({'INSECURE' if settings.insecure else 'TLS + site auth'}, Fleet API only); control on "
          f"127.0.0.1:{settings.control_port}; logs in {Path(settings.state) / 'logs'}; Ctrl-C or "
          "`medunic server stop` stops it")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _run(args: argparse.Namespace) -> int:
    if args.stage != "vocab" and not args.tokenizer:
        raise ConfigError(f"--stage {args.stage} needs --tokenizer (the folder the vocab stage wrote)")
    overrides = [*args.overrides, f"fed.expected_sites={args.sites}", f"fed.min_sites={args.min_sites}"]
    round_minimum(load_config(args.preset, overrides), args.sites)  # a bad setting fails here, not in the run
    registry = Path(_state(args)) / REGISTRY_FILE
    if not registry.is_file():
        raise ConfigError(f"{registry} does not exist: register the sites first (`medunic server register`), "
                          "or name the SuperLink's folder with --state")
    return run({"stage": args.stage, "preset": args.preset, "overrides": json.dumps(overrides), "sites": "",
                "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else "",
                "registry": str(registry.resolve())}, _state(args))
