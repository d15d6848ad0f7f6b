"""The operator's guide, command by command, as an IT team types it: certificates with the
guide's host names, the coordinator as a background service, sites onboarded with their own
keys and a site config file, a 2-round run, status, unregister and stop; the coordinator
from its config file (`medunic server init`). Everything is the
`medunic` command in its own process; the sites dial `localhost` (in the certificate with
127.0.0.1 whatever --host says; the guide's names are not resolvable here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medunic_core.cli import subprocess_env
from tests.deployment.loopback import SITES, descendants, free_port, kill_tree, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MEDUNIC = str(Path(sys.executable).with_name("medunic"))


def _has(path: Path, text: str) -> bool:
    return path.is_file() and text in path.read_text(errors="replace")


def _medunic(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MEDUNIC, *args], cwd=cwd, env=subprocess_env(FLWR_HOME=str(cwd / "flwr-home")),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(1200)
def test_the_operators_guide_end_to_end(tmp_path, synthetic_data, fed_tokenizer, train_overrides):
    port, control = free_port(), free_port()
    started: list[subprocess.Popen] = []
    try:
        out = _medunic("certs", "--out", "certs", "--host", "coordinator.example.org", "--host", "10.0.0.5",
                       cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        out = _medunic("server", "init", "--certs", "certs", "--port", str(port), "--control-port", str(control),
                       "--state", "coordinator", "--out", "coordinator.toml", "--systemd-unit",
                       "medunic-server.service", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        with (tmp_path / "server-start.out").open("w") as log:
            started.append(subprocess.Popen(
                [MEDUNIC, "server", "start", "--config", "coordinator.toml"], cwd=tmp_path,
                env=subprocess_env(FLWR_HOME=str(tmp_path / "flwr-home")), stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: _has(tmp_path / "server-start.out", "TLS + site auth"), 120, "server start")
        for site, lang in SITES.items():  # each hospital makes its own key; only the .pub travels
            assert _medunic("client", "keygen", "--site", site, "--out", f"{site}/keys", cwd=tmp_path).returncode == 0
            out = _medunic("server", "register", f"{site}/keys/{site}.pub", "--name", site, "--language", lang,
                           cwd=tmp_path)
            assert out.returncode == 0 and f"site {site} ({lang}) registered" in out.stdout, out.stderr
            out = _medunic("client", "init", "--site", site, "--language", lang, "--data", str(synthetic_data),
                           "--superlink", f"localhost:{port}", "--tokenizer", str(fed_tokenizer), "--ca",
                           "certs/ca.crt", "--key", f"{site}/keys/{site}", "--state", f"{site}/state", "--port",
                           str(free_port()), "--min-pairs", "8",  # the test's rounds: 2 x 8 pairs
                           "--out", f"{site}/site.toml", "--systemd-unit",
                           f"{site}/medunic-site.service", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            with (tmp_path / f"{site}.out").open("w") as log:
                started.append(subprocess.Popen(
                    [MEDUNIC, "client", "start", "--config", f"{site}/site.toml"], cwd=tmp_path,
                    env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
        for site in SITES:
            wait_until(lambda: _has(tmp_path / site / "state" / "logs" / "site.log", "SuperNode ID:"), 300,
                       f"{site} connected")
        status = _medunic("server", "status", "--config", "coordinator.toml", cwd=tmp_path)
        assert status.returncode == 0 and "healthy" in status.stdout, status.stdout + status.stderr
        assert all(f"site {site} ({lang}): node" in status.stdout for site, lang in SITES.items())
        assert status.stdout.count("online") == 2, status.stdout

        overrides = [*train_overrides(synthetic_data, tmp_path / "unused"), f"fed.out_dir={tmp_path / 'run'}",
                     "fed.rounds=2", "fed.local_steps=2", "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]",
                     "eval.tsne=false", f"data.cache_dir={tmp_path / 'cache-server'}"]
        out = _medunic("server", "run", "--tokenizer", str(fed_tokenizer), "--sites", "2", *overrides, cwd=tmp_path,
                       timeout=900)
        assert out.returncode == 0, out.stdout[-3000:]
        rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all(sorted(r["sites"]) == ["en-1", "es-1"] for r in rows)
        for site in SITES:  # what left each site is in its audit log
            audit = [json.loads(x) for x in (tmp_path / site / "state" / "audit.jsonl").read_text().splitlines()]
            assert [e["round"] for e in audit if e["message_type"] == "train"] == [1, 2]

        out = _medunic("server", "unregister", "es-1", cwd=tmp_path)
        assert out.returncode == 0 and "es-1" in out.stdout, out.stderr
        assert "es-1" not in _medunic("server", "status", cwd=tmp_path).stdout
        assert _medunic("server", "stop", cwd=tmp_path).returncode == 0
        assert started[0].wait(timeout=60) is not None  # `server start` ends when its SuperLink stops
        assert _medunic("server", "status", cwd=tmp_path).returncode != 0
        assert (tmp_path / "coordinator" / "logs" / "superlink.log").stat().st_size > 0  # Flower's rotated log
    finally:
        for proc in started:
            if proc.poll() is None:
                kill_tree(proc.pid)
        for pid, argv in descendants(os.getpid()).items():
            if any(str(tmp_path) in a for a in argv):
                kill_tree(pid)
        time.sleep(1)
