"""Loopback deployment: one SuperLink with TLS and SuperNode authentication and two site
daemons (EN, ES) on 127.0.0.1 -- a registered-key check and a 2-round run of the tiny
preset; a SuperNode killed mid-round (the run goes on, the restarted site rejoins); a
coordinator killed after a round (a restarted SuperLink and run resume after it, with the
checkpoint's weights and alignment state).

Every process a test starts (SuperLink, SuperNodes, and what they spawn: flower-superexec,
flwr-serverapp, flwr-clientapp; the ``flwr run`` client) is killed by PID at teardown,
also when the test fails."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from client.daemon import start as start_site
from medunic_core.exchange import arrays_sha256
from server import coordinator
from server.certs import create_all
from server.rounds import ROUNDS_FILE, SERVER_CHECKPOINT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SITES = {"en-1": "en", "es-1": "es"}
# Flower's SuperLink calls a SuperNode offline (and answers its pending messages with a
# NODE_UNAVAILABLE error) HEARTBEAT_PATIENCE (2) x 30 s after its last heartbeat: a round
# in which a site dies lasts up to about a minute longer than its training.
SITE_WAIT = 120  # s: a restarted site daemon (data check + SuperNode start) is back well within it
ROUND_TIMEOUT = 300  # s: a round's training + the minute until a dead site is declared offline, on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def _wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# -- processes, through /proc (no psutil) ---------------------------------------------
def _processes() -> dict[int, tuple[int, str, list[str]]]:
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


def _descendants(pid: int) -> dict[int, list[str]]:
    """Every process below ``pid`` (children first), with its argv; zombies left out."""
    table = _processes()
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


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it. The tree is first stopped (SIGSTOP) from the
    top down, so that nothing in it can start a child or be re-parented before the kill."""
    stopped: set[int] = set()
    while True:
        new = ({pid} | set(_descendants(pid))) - stopped
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        _signal(p, signal.SIGKILL)


def _is_flwr_run(argv: list[str]) -> bool:
    return len(argv) >= 3 and Path(argv[1]).name == "flwr" and argv[2] == "run"


class Loopback:
    """Certificates, a SuperLink with TLS + SuperNode authentication on 127.0.0.1, the two
    sites registered, their daemons, and runs; :meth:`close` kills all it started."""

    def __init__(self, tmp_path: Path, data: Path, tokenizer: Path, train_overrides: Callable) -> None:
        self.tmp, self.data, self.tokenizer, self.train_overrides = tmp_path, data, tokenizer, train_overrides
        self.certs = create_all(tmp_path / "certs", ["127.0.0.1"], [*SITES, "rogue"])
        self.port = _free_port()
        self.state = tmp_path / "coordinator"  # the SuperLink's database (registered keys) and log
        self.out = tmp_path / "run"
        self.link: Optional[subprocess.Popen] = None
        self.sites: dict[str, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []
        self.ports = [self.port]
        self.runs = 0

    # -- coordinator --------------------------------------------------------------------
    def start_link(self) -> subprocess.Popen:
        self.link = coordinator.start(str(self.certs), "127.0.0.1", self.port, str(self.state), False, None)
        self.started.append(self.link)
        _wait_port(self.port)
        return self.link

    def kill_coordinator(self) -> None:
        """SIGKILL the SuperLink with its SuperExec and ServerApp, and the ``flwr run`` client."""
        assert self.link is not None
        kill_tree(self.link.pid)
        self.link.wait(timeout=30)
        for pid, argv in _descendants(os.getpid()).items():
            if _is_flwr_run(argv):
                kill_tree(pid)

    def run_config(self, *extra: str) -> dict[str, str]:
        overrides = [*self.train_overrides(self.data, self.tmp / "unused"), f"fed.out_dir={self.out}",
                     "fed.expected_sites=2", "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]", "eval.tsne=false",
                     f"data.cache_dir={self.tmp / 'cache-server'}", *extra]
        return {"preset": "tiny", "overrides": json.dumps(overrides), "sites": "", "tokenizer": str(self.tokenizer)}

    def run(self, *extra: str) -> int:
        """``medunic server run`` with the run config: the exit code of ``flwr run``."""
        self.runs += 1
        return coordinator.run(self.run_config(*extra), timeout=60, log_file=self.tmp / f"run-{self.runs}.log")

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
        port = _free_port()
        self.ports.append(port)
        args = argparse.Namespace(
            superlink=f"127.0.0.1:{self.port}", site=site, language=SITES[site], data=str(self.data),
            tokenizer=str(self.tokenizer), cache=str(self.tmp / f"cache-{key or site}"), ca=str(self.certs / "ca.crt"),
            key=str(self.certs / "sites" / (key or site)), port=port, max_bad=0.05, insecure=False,
            dp_max_epsilon=None, dp_max_delta=None,
        )
        proc = start_site(args)
        self.started.append(proc)
        if key is None:
            self.sites[site] = proc
        return proc

    def kill_site(self, site: str) -> None:
        kill_tree(self.sites[site].pid)
        self.sites[site].wait(timeout=30)

    def clientapps(self, site: str) -> list[int]:
        """The live flwr-clientapp processes of a site's SuperNode (one per message it handles)."""
        return [p for p, argv in _descendants(self.sites[site].pid).items()
                if len(argv) > 1 and Path(argv[1]).name == "flwr-clientapp"]

    def close(self) -> None:
        for pid, argv in _descendants(os.getpid()).items():
            if _is_flwr_run(argv):
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
        for pid, (_, state, argv) in _processes().items():
            if state != "Z" and any(a in addresses for a in argv) and pid != os.getpid():
                kill_tree(pid)


@pytest.fixture
def loopback(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
    """A running federation: SuperLink (TLS + site auth), en-1 and es-1 registered, both
    site daemons started. Everything it or the test started is killed afterwards."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    lb = Loopback(tmp_path, synthetic_data, fed_tokenizer, train_overrides)
    try:
        lb.start_link()
        for site in SITES:
            coordinator.register_site(str(lb.certs / "sites" / f"{site}.pub"), site)
        for site in SITES:
            lb.start_site(site)
        yield lb
    finally:
        lb.close()


def test_tls_and_site_auth_two_rounds(loopback):
    # an unregistered key is refused by the SuperLink: that SuperNode exits
    assert loopback.start_site("es-1", key="rogue").wait(timeout=120) != 0
    assert loopback.run("fed.rounds=2", "fed.local_steps=2") == 0
    rows = loopback.rows()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert sorted(r["sites"]) == ["en-1", "es-1"] and r["failed"] == 0
        assert r["train"]["train_loss"] > 0 and set(r["sites_eval"]) == {"en-1", "es-1"}
        assert 0 <= r["central"]["zeroshot_en"] <= 1
    assert (loopback.out / "model" / "checkpoint.pt").is_file()


@pytest.mark.timeout(1500)
def test_a_site_killed_mid_round_does_not_stop_the_run_and_rejoins(loopback):
    wait = loopback.run_in_background("fed.rounds=3", "fed.local_steps=2", "fed.min_sites=1",
                                      f"fed.site_wait={SITE_WAIT}", f"fed.round_timeout={ROUND_TIMEOUT}",
                                      "fed.eval_every=100")
    # round 1 is training at es-1: its SuperNode runs a ClientApp and no round is logged yet
    _wait_until(lambda: loopback.clientapps("es-1"), 300, "es-1 starting round 1's ClientApp", every=0.2)
    assert loopback.rows() == []
    loopback.kill_site("es-1")  # SIGKILL: the SuperNode, its SuperExec and the ClientApp
    _wait_until(loopback.rows, ROUND_TIMEOUT + 120, "round 1 without es-1")
    loopback.start_site("es-1")  # the same key: the same registered SuperNode
    assert wait(1200) == 0
    rows = loopback.rows()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["sites"] == ["en-1"] and rows[0]["failed"] == 1  # the dead site's reply: an error
    assert rows[0]["train"]["train_loss"] > 0  # round 1 aggregated en-1
    assert any("es-1" in r["sites"] for r in rows[1:])  # the restarted site trained again
    assert sorted(rows[-1]["sites"]) == ["en-1", "es-1"] and rows[-1]["failed"] == 0
    assert set(rows[-1]["sites_eval"]) == {"en-1", "es-1"}


@pytest.mark.timeout(1500)
def test_a_restarted_coordinator_resumes_with_the_same_weights_and_alignment(loopback):
    run = ("fed.rounds=3", "fed.local_steps=2", "align.train_norm=mixed", "fed.eval_every=100",
           f"fed.site_wait={SITE_WAIT}", f"fed.round_timeout={ROUND_TIMEOUT}")
    wait = loopback.run_in_background(*run)
    _wait_until(lambda: (loopback.out / SERVER_CHECKPOINT).is_file(), 900, "round 1's server checkpoint")
    # kill it while round 2 trains: both sites run a ClientApp started after round 1's checkpoint
    before = {p for site in SITES for p in loopback.clientapps(site)}
    _wait_until(lambda: all(set(loopback.clientapps(site)) - before for site in SITES), 300,
                "both sites training round 2", every=0.2)
    loopback.kill_coordinator()  # SIGKILL: SuperLink, SuperExec, ServerApp, and the `flwr run` client
    assert wait(60) not in (0, None)
    saved = loopback.tmp / "checkpoint-at-kill.pt"
    shutil.copy(loopback.out / SERVER_CHECKPOINT, saved)  # nothing writes it any more
    state = torch.load(saved, map_location="cpu", weights_only=False)
    k = int(state["round"])
    # the row of a round is written just before its checkpoint: at most one row ahead
    assert [r["round"] for r in loopback.rows()] in (list(range(1, k + 1)), list(range(1, k + 2)))
    assert k < 3 and {name.split("/")[0] for name in state["alignment"]} == {"en", "es"}

    loopback.start_link()  # the same database (registered keys) and port
    for site, proc in loopback.sites.items():  # the SuperNodes retry until the SuperLink is back
        assert proc.poll() is None, f"{site}'s SuperNode exited ({proc.returncode}) while the SuperLink was down"
    assert loopback.run_in_background(*run)(1200) == 0
    rows = loopback.rows()
    assert [r["round"] for r in rows] == [1, 2, 3]  # each exactly once
    resumed = [r for r in rows if "resumed" in r]
    assert [r["round"] for r in resumed] == [k + 1]
    assert resumed[0]["resumed"] == {"after_round": k, "weights_sha256": arrays_sha256(state["arrays"]),
                                     "alignment_sha256": arrays_sha256(state["alignment"])}
    assert all(sorted(r["sites"]) == ["en-1", "es-1"] for r in rows[k:])

