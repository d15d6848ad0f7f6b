"""The attacks of an outsider who holds everything public (ca.crt, the code, the port) against
a loopback deployment made as docs/deployment.md says, and a foreign app that reaches the
sites anyway (as through a compromised coordinator), and a curious coordinator's run of
one-pair rounds. Each attack must fail with the expected message, the foreign app must
never execute anywhere, no site may send anything to the curious run, and a legitimate run
must still complete its rounds."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.keys import create_site_keys
from client.supernode import installed_app_hash
from medunic_core.cli import subprocess_env
from server.coordinator import CONNECTION, run_status, write_connection
from server.registry import REGISTRY_FILE, SiteRegistry
from server.superlink import (
    BUSY, IDLE_DEADLINE, MAX_BODY, MAX_CONNECTIONS_PER_ADDRESS, MAX_HELD_PER_ADDRESS, REFUSAL, TOO_LARGE)

from tests.deployment.loopback import (
    MIN_PAIRS, SITES, closed_by_server, free_port, loopback_federation, silent_connection, still_open, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EVIL_CLIENT = '''
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text(repr(dict(context.node_config)))
    loot = {"node_config": repr(dict(context.node_config))}
    if context.node_config.get("data-path"):
        loot["manifest"] = Path(str(context.node_config["data-path"])).read_text()[:500]
    return Message(RecordDict({"loot": ConfigRecord(loot)}), reply_to=msg)
'''
EVIL_SERVER = r'''
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    report = Path(str(context.run_config["marker"]) + "-coordinator")
    report.write_text("ran at the coordinator\n")
    msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), message_type="query", dst_node_id=n)
            for n in grid.get_node_ids()]
    lines = [f"EVIL REPLY: {reply.error.reason if reply.has_error() else dict(reply.content['loot'])}"
             for reply in grid.send_and_receive(msgs, timeout=120)]
    report.write_text("ran at the coordinator\n" + "\n".join(lines) + "\nDONE\n")
'''


def _evil_app(folder: Path) -> Path:
    """A hand-written Flower app of another publisher: its ClientApp reads the site's node
    config and manifest and writes a marker file; its ServerApp writes one too."""
    (folder / "evil").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil.server_app:app"\nclientapp = "evil.client_app:app"\n\n'
        '[tool.flwr.app.config]\nmarker = ""\n')
    (folder / "evil" / "__init__.py").write_text("")
    (folder / "evil" / "client_app.py").write_text(EVIL_CLIENT)
    (folder / "evil" / "server_app.py").write_text(EVIL_SERVER)
    return folder


def _flwr(home: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """The ``flwr`` CLI as someone whose FLWR_HOME is ``home``: (exit code, output as one line)."""
    out = subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], env=subprocess_env(FLWR_HOME=str(home)),
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, " ".join(re.sub("[│╭╮╰╯─]", " ", out.stdout + out.stderr).split())


@pytest.mark.timeout(1500)
def test_an_outsider_with_only_the_ca_cannot_run_code_control_the_run_or_join(
        tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
    for lb in loopback_federation(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
        node_ids = {s.name: s.node_id for s in SiteRegistry.load(lb.state / REGISTRY_FILE).sites.values()}
        # the outsider: ca.crt, this code, the public port; their own key pair and app
        outsider = tmp_path / "outsider"
        write_connection(f"127.0.0.1:{lb.port}", lb.certs / "ca.crt", False, home=outsider, name="evil")
        create_site_keys(outsider / "keys", "evil")
        app = _evil_app(outsider / "app")
        marker = outsider / "PWNED"

        # 1 + 2: run their own code at the sites and at the coordinator
        rc, out = _flwr(outsider, "run", str(app), "evil", "--stream", "--run-config", f'marker="{marker}"')
        assert REFUSAL in out, out
        # 3: register their own SuperNode key, unregister a real site, join with an unregistered key
        rc, out = _flwr(outsider, "supernode", "register", str(outsider / "keys" / "evil.pub"), "evil", "--name", "x")
        assert rc != 0 and REFUSAL in out, out
        rc, out = _flwr(outsider, "supernode", "unregister", str(node_ids["en-1"]), "evil")
        assert rc != 0 and REFUSAL in out, out
        with (outsider / "supernode.log").open("w") as log:
            joined = subprocess.Popen([str(Path(sys.executable).with_name("flower-supernode")), "--superlink",
                                       f"127.0.0.1:{lb.port}", "--port", str(free_port()), "--root-certificates",
                                       str(lb.certs / "ca.crt"), "--auth-supernode-private-key",
                                       str(outsider / "keys" / "evil"), "--max-retries", "1"],
                                      env=subprocess_env(FLWR_HOME=str(outsider)), stdout=log, stderr=subprocess.STDOUT)
        lb.started.append(joined)
        assert joined.wait(timeout=120) != 0
        assert "[code: 2004] Failed to activate SuperNode" in (outsider / "supernode.log").read_text()
        # 4: make the SuperLink buffer a huge body (Flower reads a body whole before it checks the
        # signature): a 10 GB Content-Length is answered 413 at once, over TLS with only ca.crt
        tls = ssl.create_default_context(cafile=str(lb.certs / "ca.crt"))

        def announce(size: int) -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", lb.port), timeout=30)
            sock = tls.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Length: {size}\r\n\r\n".encode())
            return sock

        def answer(sock: ssl.SSLSocket) -> tuple[int, str]:
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, response.read().decode()

        with announce(10**10) as sock:
            status, text = answer(sock)
            assert status == 413 and TOO_LARGE.format(MAX_BODY) in text
        # 4b: ... or many bodies just under the cap, each held open: from one address no more
        # than MAX_HELD_PER_ADDRESS is taken up; the next is answered 503 at once
        held = [announce(MAX_BODY) for _ in range(MAX_HELD_PER_ADDRESS // MAX_BODY)]
        time.sleep(1)
        with announce(MAX_BODY) as sock:
            status, text = answer(sock)
            assert status == 503 and BUSY in text
        for sock in held:
            sock.close()
        # 4c: ... or connections that never send a request, each of which held a file descriptor
        # for ever (a systemd service has 1024): from one address (here 127.0.0.2) at most
        # MAX_CONNECTIONS_PER_ADDRESS; the next is closed at once, and all after IDLE_DEADLINE s
        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", lb.port), timeout=30, source_address=("127.0.0.2", 0))
            return tls.wrap_socket(raw, server_hostname="127.0.0.1")

        idle = [connect() for _ in range(MAX_CONNECTIONS_PER_ADDRESS)]
        try:
            assert closed_by_server(connect(), 5)
        except (ssl.SSLError, ConnectionResetError):  # closed while its handshake ended: closed too
            pass
        assert not any(closed_by_server(sock, 0.01) for sock in idle)
        assert all(closed_by_server(sock, IDLE_DEADLINE + 10) for sock in idle)
        # 4d: ... or connections that never start their TLS handshake, which were not counted at
        # all (one address held every one it opened, for asyncio's 60 s handshake timeout, again
        # and again): from 127.0.0.3 too, at most MAX_CONNECTIONS_PER_ADDRESS stay open
        opened = [silent_connection(lb.port, "127.0.0.3") for _ in range(2 * MAX_CONNECTIONS_PER_ADDRESS)]
        stayed = wait_until(lambda: still_open(opened, at_most=MAX_CONNECTIONS_PER_ADDRESS), 30,
                            "the silent connections beyond the address's bound closed")
        assert len(stayed) == MAX_CONNECTIONS_PER_ADDRESS
        for sock in stayed:
            sock.close()

        # 5: list, read the logs of and stop the legitimate run while it runs (which still completes)
        wait = lb.run_in_background("fed.rounds=2", "fed.local_steps=2")
        run_id = wait_until(lambda: re.findall(r"Successfully started run (\d+)",
                                               (tmp_path / "run-1.log").read_text(errors="replace"))
                            if (tmp_path / "run-1.log").exists() else None, 120, "the legitimate run starting")[0]
        for command in (["ls", "evil"], ["log", run_id, "evil"], ["stop", run_id, "evil"]):
            rc, out = _flwr(outsider, *command)
            assert rc != 0 and REFUSAL in out, (command, out)
        assert wait(1200) == 0
        rows = lb.rows()
        assert [r["round"] for r in rows] == [1, 2]
        assert all(sorted(r["sites"]) == ["en-1", "es-1"] and r["invalid"] == {} for r in rows)
        assert all(proc.poll() is None for proc in lb.sites.values())  # no site was shut down
        assert not marker.exists() and not Path(f"{marker}-coordinator").exists()  # nothing of theirs ran


@pytest.mark.timeout(1500)
def test_a_site_runs_only_the_app_it_allows(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
    for lb in loopback_federation(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
        # a foreign app reaches the sites through the control listener (as a compromised
        # coordinator could send it): every site refuses it before installing anything
        app = _evil_app(tmp_path / "evil-app")
        marker = tmp_path / "PWNED"
        rc, started = _flwr(tmp_path / "flwr-home", "run", str(app), "medunic", "--run-config", f'marker="{marker}"')
        assert rc == 0, started
        report = Path(f"{marker}-coordinator")  # its ServerApp runs at the coordinator ...
        out = wait_until(lambda: report.exists() and "DONE" in report.read_text() and report.read_text(), 300,
                         f"the foreign ServerApp's replies ({started})")
        refusals = re.findall(r"EVIL REPLY: site refused the app: refused to run app 'outsider/evil' version "
                              r"1\.0\.0 with FAB sha256 ([0-9a-f]{64})", out)
        assert len(refusals) == len(SITES), out  # ... and gets an error reply from every site
        assert "node_config" not in out and not marker.exists()  # no ClientApp of it ever ran
        for site in SITES:
            log = lb.site_log(site).read_text(errors="replace")
            assert f"refused to run app 'outsider/evil' version 1.0.0 with FAB sha256 {refusals[0]}" in log
            assert f"--allow-app {refusals[0]}" in log and installed_app_hash()[:12] in log
            assert not list(lb.site_home(site).glob("apps/outsider*"))  # never installed at the site
            assert lb.sites[site].poll() is None  # the daemon keeps running
        foreign = re.search(r"Successfully started run (\d+)", started).group(1)
        home = subprocess_env(FLWR_HOME=str(tmp_path / "flwr-home"))
        wait_until(lambda: run_status(CONNECTION, foreign, home)[0].startswith("finished"), 120, "the foreign run ending")
        # a curious coordinator shrinks a round to one pair (one report's token flags, one
        # pair's alignment sums): every site refuses before it trains, and sends nothing
        lb.run("fed.rounds=1", "fed.local_steps=1", "train.batch_size=1")
        assert [(r["sites"], sorted(r["failed_sites"])) for r in lb.rows()] == [([], sorted(SITES))]
        refusal = f"releases nothing drawn from fewer than {MIN_PAIRS} distinct pairs"
        assert (tmp_path / f"run-{lb.runs}.log").read_text(errors="replace").count(refusal) >= 1
        for site in SITES:
            assert refusal in lb.site_log(site).read_text(errors="replace")
            audit = lb.site_state(site) / "audit.jsonl"  # the site's log of what it sent: evaluation and
            sent = [json.loads(x)["message_type"] for x in audit.read_text().splitlines()]  # statistics of all
            assert sent and not [t for t in sent if t.startswith("train")], sent  # its records, no round
            assert lb.sites[site].poll() is None
        # the medunic app still runs: a legitimate run completes (started over in the same folder:
        # a checkpoint continues only the run that wrote it)
        rc = lb.run("fed.rounds=1", "fed.local_steps=2", "fed.resume=false")
        assert rc == 0, (tmp_path / f"run-{lb.runs}.log").read_text()
        assert [r["round"] for r in lb.rows()] == [1]
        assert all(sorted(r["sites"]) == ["en-1", "es-1"] for r in lb.rows())
