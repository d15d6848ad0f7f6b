"""Differential privacy: the epsilon medunic reports equals Opacus's accountant computed
independently for the same settings; bad DP settings are clear errors; a site update is
clipped and noised; the site's ledger composes its releases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medunic_core.config import load_config
from medunic_core.data.manifest import read_manifest
from medunic_core.errors import ConfigError
from medunic_core.mlm import train_mlm
from medunic_core.errors import PrivacyBudgetError
from medunic_core.privacy import (
    check_min_df,
    check_round_size,
    releasable_languages,
    DEFAULT_MAX_DELTA,
    ReleaseLedger,
    check_release,
    privatize_update,
    update_noise_multiplier,
)


def _opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dp.sgd.enabled=true", "dp.sgd.noise_multiplier=1.0"], "needs dp.sgd.delta"),
        (["dp.updates.enabled=true", "dp.updates.epsilon=8"], "needs dp.updates.delta"),
        (["dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.epsilon=0"], "epsilon must be > 0"),
        (["dp.sgd.enabled=true", "dp.sgd.delta=1e-5", "dp.sgd.epsilon=-1"], "epsilon must be > 0"),
        (["dp.sgd.enabled=true", "dp.sgd.delta=1.5", "dp.sgd.epsilon=3"], "not in (0, 1)"),
        (["dp.sgd.enabled=true", "dp.sgd.delta=1e-5"], "exactly one of dp.sgd.epsilon"),
        (["dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.epsilon=3", "dp.updates.noise_multiplier=1"],
         "exactly one of"),
        (["dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.epsilon=3", "dp.updates.clip=0"],
         "dp.updates.clip"),
    ],
)
def test_bad_dp_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", overrides)


def test_dp_sgd_mlm_reports_the_accountants_epsilon(synthetic_data, train_overrides, tmp_path):
    steps, batch, noise, delta = 12, 8, 1.1, 1e-5
    cfg = load_config("tiny", [
        *train_overrides(synthetic_data, tmp_path / "vlp"), f"mlm.out_dir={tmp_path / 'mlm'}", f"mlm.steps={steps}",
        f"mlm.batch_size={batch}", "mlm.log_every=4", "dp.sgd.enabled=true", f"dp.sgd.noise_multiplier={noise}",
        f"dp.sgd.delta={delta}",
    ])
    result = train_mlm(cfg, progress=False)
    n = len(read_manifest(synthetic_data, None, split="train"))
    sample_rate = 1 / math.ceil(n / batch)  # Opacus: one expected batch of `batch` per pass
    rows = [json.loads(line) for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(noise, sample_rate, r["step"], delta), rel=1e-9)
    saved = json.loads((tmp_path / "mlm" / "privacy.json").read_text())
    assert saved["epsilon"] == pytest.approx(_opacus_epsilon(noise, sample_rate, steps, delta), rel=1e-9)
    assert result.privacy["steps"] == steps and np.isfinite(result.final_loss)
    assert (result.text_encoder / "config.json").is_file()


def test_dp_sgd_target_epsilon_is_met(synthetic_data, train_overrides, tmp_path):
    cfg = load_config("tiny", [
        *train_overrides(synthetic_data, tmp_path / "vlp"), f"mlm.out_dir={tmp_path / 'mlm'}", "mlm.steps=6",
        "mlm.batch_size=8", "dp.sgd.enabled=true", "dp.sgd.epsilon=4", "dp.sgd.delta=1e-5",
    ])
    privacy = train_mlm(cfg, progress=False).privacy
    assert 3.9 <= privacy["epsilon"] <= 4.0  # Opacus picks the least noise within the target (tolerance 0.01)


def test_update_noise_for_a_target_epsilon_composes_to_it():
    cfg = load_config("tiny", ["dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.epsilon=8"])
    z = update_noise_multiplier(cfg.dp.updates, rounds=5)
    # independently: 5 releases of a Gaussian mechanism with sensitivity 2 x clip and std z x clip
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=z / 2, steps=5, orders=orders),
                               delta=1e-5)
    assert 7.9 <= eps <= 8.0


def test_privatize_update_clips_then_adds_noise():
    received = {"a": np.zeros((1000,), np.float32), "b": np.ones((10, 10), np.float32)}
    trained = {"a": np.full((1000,), 0.1, np.float32), "b": np.ones((10, 10), np.float32)}
    clip = 1.0
    released, norm = privatize_update(received, trained, clip, 0.0)  # no noise: the clipped update
    assert norm == pytest.approx(math.sqrt(1000 * 0.01), rel=1e-6)
    delta = np.concatenate([(released[k] - received[k]).ravel() for k in received])
    assert np.linalg.norm(delta) == pytest.approx(clip, rel=1e-5)
    noisy, _ = privatize_update(received, trained, clip, 2.0, np.random.default_rng(0))
    noise = (noisy["a"] - released["a"]).astype(np.float64)
    assert noise.std() == pytest.approx(2.0 * clip, rel=0.1)
    again, _ = privatize_update(received, trained, clip, 2.0)  # OS entropy: never the same noise twice
    assert not np.allclose(again["a"], noisy["a"])


def test_ledger_composes_releases_across_runs_and_restarts(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = ReleaseLedger(path)
    for rnd in (1, 2, 3):
        ledger.add("run-a", rnd, noise_multiplier=4.0, clip=1.0)
    ledger = ReleaseLedger(path)  # a restarted site reads what it released before
    ledger.add("run-b", 1, noise_multiplier=4.0, clip=1.0)
    assert ledger.epsilon(1e-5, run="run-a") == pytest.approx(_opacus_epsilon(2.0, 1.0, 3, 1e-5))
    assert ledger.epsilon(1e-5) == pytest.approx(_opacus_epsilon(2.0, 1.0, 4, 1e-5))
    assert ledger.epsilon(1e-5, next_noise=4.0) == pytest.approx(_opacus_epsilon(2.0, 1.0, 5, 1e-5))


def test_dp_linear_probe_learns_and_reports_the_accountants_epsilon():
    from medunic_core.evaluation.linear_probe import dp_linear_probe

    rng = np.random.default_rng(0)
    n, d, k = 400, 16, 3
    x = rng.normal(size=(n, d))
    y = (x[:, :k] + 0.3 * rng.normal(size=(n, k)) > 0).astype(float)
    y[::7, 1] = np.nan  # unknown labels are skipped
    cfg = load_config("tiny", ["dp.sgd.enabled=true", "dp.sgd.noise_multiplier=0.8", "dp.sgd.delta=1e-5",
                               "dp.sgd.probe_epochs=5"])
    res = dp_linear_probe(x[:300], y[:300], x[300:], y[300:], cfg.dp.sgd, fractions=[0.5, 1.0], seeds=[0],
                          findings=["a", "b", "c"], batch_size=50)
    assert res[1.0]["mean"] > 0.8  # the probe learns despite the noise
    steps_full, steps_half = 5 * math.ceil(300 / 50), 5 * math.ceil(150 / 50)
    assert res[1.0]["privacy"]["epsilon_per_fit"] == pytest.approx(
        _opacus_epsilon(0.8, 1 / math.ceil(300 / 50), steps_full, 1e-5), rel=1e-9)
    accountant = RDPAccountant()
    accountant.history = [(0.8, 1 / 3, steps_half), (0.8, 1 / 6, steps_full)]
    assert res[0.5]["privacy"]["epsilon_all_fits"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_a_run_cannot_stretch_an_epsilon_only_budget_with_a_large_delta(tmp_path):
    """The attack: a site started with --dp-max-epsilon 2 only; the coordinator's run asks
    for delta 0.9, at which the same noise costs far less epsilon than at 1e-5, so the site
    would release several times what its budget means. The site holds its epsilon at
    DEFAULT_MAX_DELTA instead and refuses the run's delta."""
    updates = lambda delta: load_config("tiny", ["dp.updates.enabled=true", f"dp.updates.delta={delta}",
                                                 "dp.updates.noise_multiplier=6"]).dp.updates
    ledger = ReleaseLedger(tmp_path / "ledger.json")
    assert ledger.epsilon(0.9, next_noise=6.0) < 0.2 < 2.0 < ledger.epsilon(DEFAULT_MAX_DELTA, next_noise=6.0) * 3
    with pytest.raises(PrivacyBudgetError, match="delta=0.9 is above the site's dp-max-delta=1e-05"):
        check_release(updates(0.9), 5, ledger, 1, "es-1", max_epsilon=2.0)
    assert check_release(updates(DEFAULT_MAX_DELTA), 5, ledger, 1, "es-1", max_epsilon=2.0) == 6.0
    assert check_release(updates(1e-3), 5, ledger, 1, "es-1", max_epsilon=2.0, max_delta=1e-3) == 6.0  # its own


def test_release_floors_count_distinct_pairs_per_language():
    """A site's floors (min-pairs): a round is refused when it cannot draw on enough distinct
    pairs; a language's sums drawn from fewer stay at the site; nothing at all is released
    when every language falls short, even if their total would pass."""
    check_round_size(32, 280, 32, "en-1", "round 1")
    with pytest.raises(PrivacyBudgetError, match="fewer than 32 distinct pairs .* at most 1 \\(1 planned, 280"):
        check_round_size(1, 280, 32, "en-1", "round 1")  # train.batch_size=1 fed.local_steps=1
    with pytest.raises(PrivacyBudgetError, match="at most 20 \\(64 planned, 20 records"):
        check_round_size(64, 20, 32, "en-1", "round 1")  # fed.max_site_records cannot shrink it: the site's own data
    assert releasable_languages({"en": 40, "es": 3}, 32, "mix-1", "round 2") == ("en",)
    assert releasable_languages({"en": 40, "es": 33}, 32, "mix-1", "round 2") == ("en", "es")
    with pytest.raises(PrivacyBudgetError, match="no language's alignment sums .* drew \\{'en': 20, 'es': 20\\}"):
        releasable_languages({"en": 20, "es": 20}, 32, "mix-1", "round 2")
    with pytest.raises(PrivacyBudgetError, match="at most 8"):
        releasable_languages({"en": 8}, 32, "en-1", "round 2")
    assert releasable_languages({"en": 1}, 0, "sim-1", "round 1") == ("en",)  # simulation: no floor
    check_min_df(2, 2, "en-1")
    with pytest.raises(PrivacyBudgetError, match="at least 5 of its reports .* vocab.min_df=2"):
        check_min_df(2, 5, "en-1")
