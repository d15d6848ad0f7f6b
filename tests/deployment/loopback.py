"""A loopback federation for the slow deployment tests: certificates, a SuperLink (TLS +
SuperNode authentication, Fleet API only on its public port) on 127.0.0.1, the sites' own
key pairs registered, their daemons, and runs.

Every process a test starts (SuperLink, SuperNodes, and what they spawn: flower-superexec,
flwr-serverapp, flwr-clientapp; the ``flwr run`` client) is killed by PID at teardown,
also when the test fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from client.daemon import SiteSettings
from client.daemon import start as start_site
from client.keys import create_site_keys
from server import coordinator
from server.certs import create_all
from server.registry import REGISTRY_FILE
from server.rounds import ROUNDS_FILE

SITES = {"en-1": "en", "es-1": "es"}
# Flower's SuperLink calls a SuperNode offline (and answers its pending messages with a
# NODE_UNAVAILABLE error) HEARTBEAT_PATIENCE (2) x 30 s after its last heartbeat: a round
# in which a site dies lasts up to about a minute longer than its training.
SITE_WAIT = 120  # s: a restarted site daemon (data check + SuperNode start) is back well within it
# The sites' release floor: the tests' rounds are 2 steps of 8 pairs from about 30 records a
# site, so a round that crosses an epoch may repeat pairs; one batch is always 8 distinct.
MIN_PAIRS = 8
ROUND_TIMEOUT = 300  # s: a round's training + the minute until a dead site is declared offline, on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (plain or TLS) within ``within`` seconds; it sends
    nothing first."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionResetError, ssl.SSLError):
        return True


def silent_connection(port: int, source: str) -> Optional[socket.socket]:
    """A TCP connection from ``source`` to 127.0.0.1:``port`` that never sends a byte (no TLS
    ClientHello), or None where the server reset it while it was being made."""
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    except ConnectionResetError:
        return None


def still_open(socks: Sequence[Optional[socket.socket]], at_most: Optional[int] = None) -> Optional[list[socket.socket]]:
    """Those of ``socks`` the server has not closed, or None while more than ``at_most`` are
    (a predicate for :func:`wait_until`); None entries were refused."""
    left = [sock for sock in socks if sock is not None and not closed_by_server(sock, 0.02)]
    return None if at_most is not None and len(left) > at_most else left


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# -- processes, through /proc (no psutil) ---------------------------------------------
def processes() -> dict[int, tuple[int, str, list[str]]]:
    """pid -> (parent pid, state letter, argv) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), fields[0], [a for a in argv if a])
    return out


def descendants(pid: int) -> dict[int, list[str]]:
    """Every process below ``pid`` (children first), with its argv; zombies left out."""
    table = processes()
    found: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for child, (ppid, state, argv) in table.items():
            if ppid == parent and child not in found:
                todo.append(child)
                if state != "Z":
                    found[child] = argv
    return found


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it. The tree is first stopped (SIGSTOP) from the
    top down, so that nothing in it can start a child or be re-parented before the kill."""
    stopped: set[int] = set()
    while True:
        new = ({pid} | set(descendants(pid))) - stopped
        if not new:
            break
        for p in new:
            send_signal(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        send_signal(p, signal.SIGKILL)


def is_flwr_run(argv: list[str]) -> bool:
    return len(argv) >= 3 and Path(argv[1]).name == "flwr" and argv[2] == "run"


class Loopback:
    """Certificates, a SuperLink with TLS + SuperNode authentication on 127.0.0.1, the two
    sites registered, their daemons, and runs; :meth:`close` kills all it started."""

    def __init__(self, tmp_path: Path, data: Path, tokenizer: Path, train_overrides: Callable) -> None:
        self.tmp, self.data, self.tokenizer, self.train_overrides = tmp_path, data, tokenizer, train_overrides
        self.certs = create_all(tmp_path / "certs", ["127.0.0.1"])
        self.keys = tmp_path / "site-keys"  # each site makes its own pair; only the .pub reaches the coordinator
        for site in [*SITES, "rogue"]:
            create_site_keys(self.keys, site)
        self.port, self.control_port = free_port(), free_port()  # public (Fleet API) and control listeners
        self.state = tmp_path / "coordinator"  # the SuperLink's database (registered keys), site registry, log
        self.out = tmp_path / "run"
        self.link: Optional[subprocess.Popen] = None
        self.sites: dict[str, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []
        self.ports = [self.port, self.control_port]
        self.runs = 0

    # -- coordinator --------------------------------------------------------------------
    def start_link(self) -> subprocess.Popen:
        self.link = coordinator.start(coordinator.CoordinatorSettings(str(self.certs), "127.0.0.1", self.port,
                                                                    self.control_port, str(self.state)))
        self.started.append(self.link)
        wait_port(self.port)
        return self.link

    def register(self, site: str) -> int:
        return coordinator.register_site(str(self.keys / f"{site}.pub"), site, SITES[site], str(self.state))

    def kill_coordinator(self) -> None:
        """SIGKILL the SuperLink with its SuperExec and ServerApp, and the ``flwr run`` client."""
        assert self.link is not None
        kill_tree(self.link.pid)
        self.link.wait(timeout=30)
        for pid, argv in descendants(os.getpid()).items():
            if is_flwr_run(argv):
                kill_tree(pid)

    def run_config(self, *extra: str) -> dict[str, str]:
        overrides = [*self.train_overrides(self.data, self.tmp / "unused"), f"fed.out_dir={self.out}",
                     "fed.expected_sites=2", "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]", "eval.tsne=false",
                     f"data.cache_dir={self.tmp / 'cache-server'}", *extra]
        return {"stage": "vlp", "preset": "tiny", "overrides": json.dumps(overrides), "sites": "",
                "tokenizer": str(self.tokenizer),
                "registry": str(self.state / REGISTRY_FILE)}

    def run(self, *extra: str) -> int:
        """``medunic server run`` with the run config: the exit code of ``flwr run``."""
        self.runs += 1
        return coordinator.run(self.run_config(*extra), str(self.state), log_file=self.tmp / f"run-{self.runs}.log")

    def run_in_background(self, *extra: str) -> Callable[[float], Optional[int]]:
        """Start :meth:`run` in a thread; returns ``wait(timeout)`` -> exit code (None: still running)."""
        result: dict[str, object] = {}

        def target() -> None:
            try:
                result["rc"] = self.run(*extra)
            except BaseException as e:  # noqa: BLE001 -- reported by wait()
                result["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()

        def wait(timeout: float) -> Optional[int]:
            # short joins: a signal (Ctrl-C, pytest-timeout) that another thread receives does
            # not wake a long one, and the fixture's teardown would wait for it
            deadline = time.monotonic() + timeout
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(min(1.0, max(deadline - time.monotonic(), 0.0)))
            if "error" in result:
                raise result["error"]  # type: ignore[misc]
            return result.get("rc")  # type: ignore[return-value]

        return wait

    def rows(self) -> list[dict]:
        path = self.out / ROUNDS_FILE
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    # -- sites --------------------------------------------------------------------------
    def start_site(self, site: str, key: Optional[str] = None) -> subprocess.Popen:
        """``medunic client start`` for ``site`` with the SuperNode key ``key`` (default: its own)."""
        port = free_port()
        self.ports.append(port)
        name = key or site
        settings = SiteSettings(site, SITES[site], str(self.data), f"127.0.0.1:{self.port}", str(self.tokenizer),
                                ca=str(self.certs / "ca.crt"), key=str(self.keys / name),
                                state=str(self.site_state(name)), cache=str(self.tmp / f"cache-{name}"), port=port,
                                min_pairs=MIN_PAIRS)
        proc = start_site(settings, log=str(self.site_log(name)))
        self.started.append(proc)
        if key is None:
            self.sites[site] = proc
        return proc

    def site_state(self, site: str) -> Path:
        return self.tmp / f"state-{site}"

    def site_home(self, site: str) -> Path:
        """The site's own Flower folder (installed apps): in its state folder."""
        return self.site_state(site) / "flwr"

    def site_log(self, site: str) -> Path:
        return self.tmp / f"site-{site}.log"

    def kill_site(self, site: str) -> None:
        kill_tree(self.sites[site].pid)
        self.sites[site].wait(timeout=30)

    def clientapps(self, site: str) -> list[int]:
        """The live flwr-clientapp processes of a site's SuperNode (one per message it handles)."""
        return [p for p, argv in descendants(self.sites[site].pid).items()
                if len(argv) > 1 and Path(argv[1]).name == "flwr-clientapp"]

    def close(self) -> None:
        for pid, argv in descendants(os.getpid()).items():
            if is_flwr_run(argv):
                kill_tree(pid)
        for proc in self.started:
            if proc.poll() is not None:  # exited and reaped: its pid may be another process's now
                continue
            kill_tree(proc.pid)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        # what outlived a parent (re-parented away from it): found by the ports it talks to
        addresses = {f"127.0.0.1:{p}" for p in self.ports}
        for pid, (_, state, argv) in processes().items():
            if state != "Z" and any(a in addresses for a in argv) and pid != os.getpid():
                kill_tree(pid)


def loopback_federation(tmp_path: Path, monkeypatch, data: Path, tokenizer: Path, train_overrides: Callable):
    """A running federation: SuperLink (TLS + site auth), en-1 and es-1 registered, both
    site daemons started. Everything it or the test started is killed afterwards."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    lb = Loopback(tmp_path, data, tokenizer, train_overrides)
    try:
        lb.start_link()
        for site in SITES:
            lb.register(site)
        for site in SITES:
            lb.start_site(site)
        for site in SITES:  # the data check done, the SuperNode connected
            wait_until(lambda: "SuperNode ID:" in lb.site_log(site).read_text(errors="replace"), 300, f"{site} connecting")
        yield lb
    finally:
        lb.close()


