"""``medunic simulate``: ``flwr run .`` of this app in Flower's Simulation Engine, with
a project-local ``FLWR_HOME`` and a SuperLink it starts and stops itself.

It is a thin convenience over the run that ``flwr run . --stream`` makes: the ServerApp
(server.app) prepares everything a federation needs before its first round (synthetic
sites, then the vocabulary and MLM stages, federated) and runs the VLP stage. This command
only picks free loopback ports, gives the simulation one SuperNode per site and the
machine's cores, streams the progress, stops the SuperLink (and everything it spawned)
whatever happens, and points to the report the coordinator wrote in the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from medunic_core.cli import add_config_args, subprocess_env
from medunic_core.config import load_config
from medunic_core.constants import APP_DIR
from medunic_core.errors import MedunicError
from medunic_core.federation.runconfig import DEFAULT_SITES, parse_sites
from server.coordinator import stream_run, write_connection

log = logging.getLogger(__name__)

CONNECTION = "medunic-sim"
RUN_TAG = "MEDUNIC_SIMULATION_TAG"  # environment marker of the processes one simulation starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> int:
    """CPU cores this process may use (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_site(n_sites: int) -> int:
    """Torch threads of each simulated site: the cores shared out, at least one each, so a
    federation of fewer sites than cores still uses the whole machine."""
    return max(1, cores() // max(n_sites, 1))


def flower_env(flwr_home: Path, tag: str, threads: int = 1) -> dict[str, str]:
    """The environment of every Flower process we start: offline, quiet, project-local
    home, ``threads`` per simulated site, and a tag that finds them (and what they spawn,
    Ray included) to stop them."""
    env = subprocess_env(FLWR_HOME=str(flwr_home), **{RUN_TAG: tag})
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``RUN_TAG=tag``."""
    marker = f"{RUN_TAG}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _process_groups() -> dict[int, int]:
    """Process group of every live, non-zombie process, by PID (``/proc/<pid>/stat``)."""
    groups = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        except (OSError, ValueError):
            continue
        if state != "Z":
            groups[int(entry)] = int(pgrp)
    return groups


def stop_tagged(tag: str, grace: float = 10.0) -> None:
    """SIGTERM every tagged process and every process in their process groups, SIGKILL
    what is left after ``grace`` seconds.

    The tag alone does not find them all: Ray's agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) rename themselves over the memory that /proc shows as their
    environment, and outlive their raylet; they stay in the process group that Flower's
    SuperExec made, with the raylet. Our own group (this process, its ``flwr run``) is
    never signalled as a group. A second Ctrl-C or ``kill`` meanwhile waits until this is
    done: cut short, it would leave processes behind."""
    groups: set[int] = set()

    def alive() -> set[int]:
        by_pid = _process_groups()
        tagged = set(tagged_processes(tag))
        groups.update(by_pid[pid] for pid in tagged if pid in by_pid)
        groups.discard(os.getpgrp())
        return tagged | {pid for pid, group in by_pid.items() if group in groups and pid != os.getpid()}

    with _signals_deferred():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while (left := alive()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not left:
                return
        log.warning("processes of simulation %s still alive after SIGKILL: %s", tag, sorted(left))


@contextmanager
def _handlers(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    """These signal handlers inside the block, the previous ones again after it; nothing
    off the main thread, where signals cannot be handled."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends."""
    arrived: list[int] = []
    try:
        with _handlers({sig: lambda signum, frame: arrived.append(signum) for sig in (signal.SIGINT, signal.SIGTERM)}):
            yield
    finally:
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


def _terminate_as_exit() -> AbstractContextManager[None]:
    """SIGTERM (``kill``, a service manager, a CI timeout) ends the block through its
    ``finally`` clauses, like Ctrl-C, instead of leaving what it started running."""
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return _handlers({signal.SIGTERM: _exit})


@contextmanager
def simulation_superlink(flwr_home: Path, log_file: Path, tag: str, threads: int = 1) -> Iterator[str]:
    """Start a simulation SuperLink on a free loopback port; always stop it and all it
    spawned (simulation runtime, ServerApp, Ray) when the block ends, on SIGTERM too."""
    with _terminate_as_exit():
        yield from _superlink(flwr_home, log_file, tag, threads)


def _superlink(flwr_home: Path, log_file: Path, tag: str, threads: int) -> Iterator[str]:
    port = _free_port()  # Flower 1.42 serves the runtime, control and fleet APIs on one HTTP port
    write_connection(f"127.0.0.1:{port}", None, insecure=True, home=flwr_home, name=CONNECTION)
    command = [
        str(Path(sys.executable).with_name("flower-superlink")), "--insecure", "--simulation",
        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(command, env=flower_env(flwr_home, tag, threads), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise MedunicError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.3)
        else:
            raise MedunicError(f"flower-superlink did not open 127.0.0.1:{port} within 60 s; see {log_file}")
        yield CONNECTION
    finally:
        stop_tagged(tag)
        proc.wait()


def write_run_config(path: Path, values: dict[str, Any]) -> Path:
    """A Flower run config file (``flwr run --run-config``): keys of pyproject's [tool.flwr.app.config]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))  # JSON strings/ints are TOML
    return path


def flwr_run(connection: str, run_config: Path, n_sites: int, threads: int, flower_log: Path,
             env: dict[str, str], progress: bool) -> int:
    """``flwr run`` of this app against a simulation SuperLink, one simulated SuperNode per
    site (``threads_per_site`` CPUs each, all sites at once where the cores allow); streams
    its progress (all of it, or the round lines); 0 only if the run completed."""
    federation = (
        f"num-supernodes={n_sites} client-resources-num-cpus={threads} client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={max(2, min(n_sites * threads, cores()))}"
    )
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(APP_DIR), connection, "--stream",
               "--run-config", str(run_config), "--federation-config", federation]
    return stream_run(command, connection, env, flower_log, echo=lambda line: progress or any(
        word in line for word in ("ROUND", "round", "ERROR", "stage", "medunic: run")))


def simulate(
    preset: str,
    overrides: Sequence[str],
    sites: str = DEFAULT_SITES,
    pairs_per_site: int = 0,
    progress: bool = True,
    flwr_home: Optional[Path] = None,
    stage: str = "all",
    **run_config: Any,
) -> Path:
    """One federated simulation (the run config ``stage``, ``sites`` and ``overrides``, plus
    any other run config key); returns the run folder (``fed.out_dir``)."""
    n_sites = len(parse_sites(sites))
    run_dir = Path(load_config(preset, list(overrides)).fed.out_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_run_config(run_dir / f"run_config-{stage}.toml", {
        "stage": stage, "preset": preset, "sites": sites, "pairs": pairs_per_site,
        "overrides": json.dumps([*overrides, f"fed.out_dir={run_dir}"]), **run_config})
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or APP_DIR / ".flwr").resolve()
    print(f"federated simulation (stage {stage}): {n_sites} sites ({sites}) -> {run_dir}", flush=True)
    tag = uuid.uuid4().hex
    flower_log = run_dir / f"flower-{stage}.log"
    threads = threads_per_site(n_sites)
    with simulation_superlink(flwr_home, run_dir / "superlink.log", tag, threads) as connection:
        rc = flwr_run(connection, config, n_sites, threads, flower_log, flower_env(flwr_home, tag, threads), progress)
    done = {"all": run_dir / "model" / "checkpoint.pt", "vlp": run_dir / "model" / "checkpoint.pt",
            "text": run_dir / "vocab" / "tokenizer" / "vocab.sha256", "vocab": run_dir / "tokenizer" / "vocab.sha256",
            "mlm": run_dir / "text_encoder" / "config.json"}[stage]
    if rc != 0 or not done.is_file():
        lines = flower_log.read_text(errors="replace").splitlines()
        reason = next((line for line in reversed(lines) if "medunic:" in line), "\n".join(lines[-30:]))
        raise MedunicError(f"the federated run did not finish (flwr exit {rc}): {reason.strip()} (log: {flower_log})")
    if stage in ("all", "vlp"):
        print(f"\nreport: {run_dir / 'report' / 'report.md'}")
    return run_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("simulate", help="federated Med-UniC in Flower's Simulation Engine (EN+ES sites)")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--sites", default=DEFAULT_SITES,
                        help="sites name:lang[:pairs[:profile]], comma-separated (default: %(default)s)")
    parser.add_argument("--pairs-per-site", type=int, default=0, help="synthetic pairs per site (default: 400)")
    parser.add_argument("--rounds", type=int, default=None, help="shortcut for fed.rounds=N")
    parser.add_argument("--ctr", choices=("on", "off"), default=None, help="shortcut for loss.ctr")
    parser.add_argument("--train-norm", choices=("local", "mixed"), default=None, help="shortcut for align.train_norm")
    parser.add_argument("--eval-norm", choices=("global", "community"), default=None, help="shortcut for align.eval_norm")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"fed.rounds={args.rounds}")
    if args.ctr is not None:
        overrides.append(f"loss.ctr={'true' if args.ctr == 'on' else 'false'}")
    if args.train_norm:
        overrides.append(f"align.train_norm={args.train_norm}")
    if args.eval_norm:
        overrides.append(f"align.eval_norm={args.eval_norm}")
    simulate(args.preset, overrides, args.sites, args.pairs_per_site, not args.no_progress)
    return 0
