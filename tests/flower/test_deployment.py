"""Loopback deployment: one SuperLink with TLS and SuperNode authentication, two site
daemons (EN, ES), a registered-key check, and a 2-round run of the tiny preset."""

from __future__ import annotations

import argparse
import json
import socket
import time

import pytest

from client.daemon import start as start_site
from server import coordinator
from server.certs import create_all

pytestmark = [pytest.mark.slow, pytest.mark.integration]


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


def test_tls_and_site_auth_two_rounds(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    certs = create_all(tmp_path / "certs", ["127.0.0.1"], ["en-1", "es-1", "rogue"])
    port = _free_port()
    procs = []
    try:
        link = coordinator.start(str(certs), "127.0.0.1", port, str(tmp_path / "coordinator"), False, None)
        procs.append(link)
        _wait_port(port)
        for site in ("en-1", "es-1"):
            coordinator.register_site(str(certs / "sites" / f"{site}.pub"), site)
        sites = {}
        for site, lang in (("en-1", "en"), ("es-1", "es"), ("rogue", "es")):
            args = argparse.Namespace(
                superlink=f"127.0.0.1:{port}", site=site if site != "rogue" else "es-1", language=lang,
                data=str(synthetic_data), tokenizer=str(fed_tokenizer), cache=str(tmp_path / f"cache-{site}"),
                ca=str(certs / "ca.crt"), key=str(certs / "sites" / site), port=_free_port(), max_bad=0.05,
                insecure=False,
            )
            sites[site] = start_site(args)
            procs.append(sites[site])
        # an unregistered key is refused by the SuperLink: that SuperNode exits
        assert sites["rogue"].wait(timeout=120) != 0
        overrides = [*train_overrides(synthetic_data, tmp_path / "unused"), f"fed.out_dir={tmp_path / 'run'}",
                     "fed.rounds=2", "fed.local_steps=2", "fed.expected_sites=2", "eval.probe_fractions=[1.0]",
                     "eval.probe_seeds=[0]", "eval.tsne=false", f"data.cache_dir={tmp_path / 'cache-server'}"]
        rc = coordinator.run({"preset": "tiny", "overrides": json.dumps(overrides), "sites": "",
                              "tokenizer": str(fed_tokenizer)}, timeout=600, log_file=tmp_path / "run.log")
        assert rc == 0
        rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert sorted(r["sites"]) == ["en-1", "es-1"] and r["failed"] == 0
            assert r["train"]["train_loss"] > 0 and set(r["sites_eval"]) == {"en-1", "es-1"}
            assert 0 <= r["central"]["zeroshot_en"] <= 1
        assert (tmp_path / "run" / "model" / "checkpoint.pt").is_file()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except Exception:
                p.kill()
