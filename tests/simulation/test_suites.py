"""Every experiment suite in configs/experiments loads, and each variant's overrides make a
valid config (a typo in a suite fails here, not an hour into an experiment)."""

from __future__ import annotations

import pytest

from medunic_core.config import load_config
from medunic_core.errors import ConfigError
from medunic_core.federation.runconfig import parse_sites
from simulation.experiments import SUITES_DIR, load_suite


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_suite_and_variant_is_valid(path):
    suite = load_suite(path.stem)
    for variant in suite.variants:
        cfg = load_config("tiny", [*suite.overrides, *variant.overrides])
        if variant.sites:
            assert parse_sites(variant.sites)
        assert cfg.fed.rounds * cfg.fed.local_steps > 0


def test_the_diagnosis_gives_every_run_the_same_total_budget():
    suite = load_suite("diagnose")
    budgets = {}
    for variant in suite.variants:
        cfg = load_config("tiny", [*suite.overrides, *variant.overrides])
        budgets[variant.name] = cfg.fed.rounds * cfg.fed.local_steps * len(parse_sites(variant.sites or
                                                                                         "en-1:en,es-1:es"))
    assert set(budgets.values()) == {250}, budgets


def test_a_broken_suite_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: x, kind: federated, overrides: [data.langs=[en], a=1]}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_suite(str(bad))
