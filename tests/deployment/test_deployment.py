"""Loopback deployment: one SuperLink with TLS and SuperNode authentication and two site
daemons (EN, ES) on 127.0.0.1 -- a registered-key check and a 2-round run of the tiny
preset; a SuperNode killed mid-round (the run goes on, the restarted site rejoins); a
coordinator killed after a round (a restarted SuperLink and run resume after it, with the
checkpoint's weights and alignment state).

Every process a test starts (SuperLink, SuperNodes, and what they spawn: flower-superexec,
flwr-serverapp, flwr-clientapp; the ``flwr run`` client) is killed by PID at teardown,
also when the test fails."""

from __future__ import annotations

import shutil

import pytest
import torch

from medunic_core.exchange import arrays_sha256
from server.rounds import SERVER_CHECKPOINT

from tests.deployment.loopback import ROUND_TIMEOUT, SITE_WAIT, SITES, loopback_federation, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def loopback(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides):
    yield from loopback_federation(tmp_path, monkeypatch, synthetic_data, fed_tokenizer, train_overrides)


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
    wait_until(lambda: loopback.clientapps("es-1"), 300, "es-1 starting round 1's ClientApp", every=0.2)
    assert loopback.rows() == []
    loopback.kill_site("es-1")  # SIGKILL: the SuperNode, its SuperExec and the ClientApp
    wait_until(loopback.rows, ROUND_TIMEOUT + 120, "round 1 without es-1")
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
    wait_until(lambda: (loopback.out / SERVER_CHECKPOINT).is_file(), 900, "round 1's server checkpoint")
    # kill it while round 2 trains: both sites run a ClientApp started after round 1's checkpoint
    before = {p for site in SITES for p in loopback.clientapps(site)}
    wait_until(lambda: all(set(loopback.clientapps(site)) - before for site in SITES), 300,
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

