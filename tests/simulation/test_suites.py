"""Every experiment suite in configs/experiments loads, and each variant's overrides make a
valid config (a typo in a suite fails here, not an hour into an experiment)."""

from __future__ import annotations

import pytest

from medunic_core.config import load_config
from medunic_core.errors import ConfigError
from medunic_core.federation.runconfig import DEFAULT_SITES, parse_site_specs, parse_sites
from simulation.experiments import SUITES_DIR, load_suite


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_suite_and_variant_is_valid(path):
    suite = load_suite(path.stem)
    for variant in suite.variants:
        cfg = load_config("tiny", [*suite.overrides, *variant.overrides])
        assert parse_sites(variant.sites or suite.sites or DEFAULT_SITES)
        assert cfg.fed.rounds * cfg.fed.local_steps > 0


def test_the_diagnosis_gives_every_run_the_same_total_budget():
    suite = load_suite("diagnose")
    budgets = {}
    for variant in suite.variants:
        cfg = load_config("tiny", [*suite.overrides, *variant.overrides])
        budgets[variant.name] = cfg.fed.rounds * cfg.fed.local_steps * len(parse_sites(variant.sites or DEFAULT_SITES))
    assert set(budgets.values()) == {250}, budgets


@pytest.mark.parametrize("name", ["default", "iid-mixed", "bilingual-sites", "local-batch", "parity-1000"])
def test_every_run_of_a_suite_sees_the_same_pairs(name):
    """Steps x batch is the same for every variant: a centralized run at the federation's
    sequential steps takes fewer, larger batches, never fewer pairs."""
    suite = load_suite(name)
    pairs = {}
    for variant in suite.variants:
        cfg = load_config("tiny", [*suite.overrides, *variant.overrides])
        steps = cfg.fed.rounds * cfg.fed.local_steps * len(parse_sites(variant.sites or suite.sites or DEFAULT_SITES))
        pairs[variant.name] = steps * cfg.train.batch_size
    assert len(set(pairs.values())) == 1, pairs


def test_a_broken_suite_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: x, kind: federated, overrides: [data.langs=[en], a=1]}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_suite(str(bad))


def test_a_suite_with_malformed_sites_is_refused_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: 'en-a:en,en-b:xx'\nvariants:\n  - {name: x, kind: federated}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*en-b:xx"):
        load_suite(str(bad))


def test_the_iid_suite_gives_its_two_runs_the_same_data_and_budget():
    suite = load_suite("iid")
    sites = parse_sites(suite.sites)
    assert len(sites) == 2 and {lang for _, lang in sites} == {"en"}  # two sites of one community ...
    assert len({(s.n, s.profile) for s in parse_site_specs(suite.sites)}) == 1  # ... drawn alike: IID
    budgets = {v.name: load_config("tiny", [*suite.overrides, *v.overrides]) for v in suite.variants}
    assert {c.fed.rounds * c.fed.local_steps * len(sites) for c in budgets.values()} == {250}
    assert not any(v.sites for v in suite.variants)  # centralized trains on the union of the same two sites


def test_a_comparison_of_a_row_the_suite_does_not_make_is_refused_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: x, kind: federated}\neval_norms: [global]\n"
                   "comparisons:\n  - {name: c, a: [x / eval community], b: [x / eval global]}\n")
    with pytest.raises(ConfigError, match="x / eval community"):
        load_suite(str(bad))
    for margins, what in (("{seconds: 0.1}", "seconds"), ("{retrieval/mean/R@1: 0}", "R@1")):
        bad.write_text("variants:\n  - {name: x, kind: federated}\neval_norms: [global]\ncolumns: [retrieval/mean/R@1]\n"
                       f"comparisons:\n  - {{name: c, a: [x / eval global], b: [x / eval global], margins: {margins}}}\n")
        with pytest.raises(ConfigError, match=f"comparison 'c' has margins.*{what}"):
            load_suite(str(bad))


def test_the_default_suite_writes_its_paired_comparisons(tmp_path):
    import json

    from simulation.experiments import write_paired

    suite = load_suite("default")
    rows = {f"{v.name} / eval {n}" for v in suite.variants for n in suite.eval_norms}
    runs = {row: {m: {"mean": 0.5 + 0.01 * i, "values": [0.5 + 0.01 * i + 0.001 * s for s in range(5)]}
                  for m in suite.compare_on} for i, row in enumerate(sorted(rows))}
    (tmp_path / "compare.json").write_text(json.dumps({"metrics": list(suite.compare_on), "runs": runs}))
    (tmp_path / "compare.md").write_text("# Comparison\n")
    paired = json.loads(write_paired(tmp_path, suite, [1, 2, 3, 4, 5]).read_text())
    assert paired["seeds"] == [1, 2, 3, 4, 5]
    assert {c["comparison"] for c in paired["comparisons"]} == {c.name for c in suite.comparisons}
    assert all(c["n"] == 5 and c["verdict"] in ("better", "worse", "not resolved") for c in paired["comparisons"])
    assert "95% t-interval" in (tmp_path / "compare.md").read_text()


def test_an_experiment_records_its_command_commit_machine_and_seeds(tmp_path):
    import json

    from simulation.experiments import write_provenance

    record = json.loads(write_provenance(tmp_path / "run.json", [3, 1]).read_text())
    assert record["seeds"] == [3, 1] and record["command"] and record["date"]
    assert record["commit"] != "unknown"  # this checkout is a git repository
    assert "cores" in record["machine"] and "torch" in record["machine"]


def test_the_bilingual_sites_suite_splits_the_same_pairs_another_way():
    """Its by-language and centralized runs are parity-mean's (same names and settings, so
    recorded runs are reused); its bilingual federation differs only by the split."""
    suite, parity = load_suite("bilingual-sites"), load_suite("parity-mean")
    assert (suite.sites, suite.overrides, suite.mlm_steps) == (parity.sites, parity.overrides, parity.mlm_steps)
    assert [v for v in suite.variants if v.name in {p.name for p in parity.variants}] == list(parity.variants)
    (bilingual,) = [v for v in suite.variants if v.partition == "dealt"]
    assert not bilingual.overrides and all(lang == "en+es" for _, lang in parse_sites(bilingual.sites))
    assert len(parse_sites(bilingual.sites)) == len(parse_sites(suite.sites or DEFAULT_SITES))


def test_the_parity_1000_suite_is_local_batchs_candidate_on_the_fixed_set():
    """Its two runs are local-batch's (same names and settings: trained runs are reused and
    evaluated again on the 1000 cases); only the evaluation set differs."""
    suite, local = load_suite("parity-1000"), load_suite("local-batch")
    assert (suite.sites, suite.overrides, suite.mlm_steps) == (local.sites, local.overrides, local.mlm_steps)
    assert list(suite.variants) == [v for v in local.variants if v.name in {w.name for w in suite.variants}]
    assert len(suite.variants) == 2 and (suite.eval_set, local.eval_set) == (1000, 0)


@pytest.mark.parametrize("variant", [
    "{name: x, kind: federated, sites: 'a:en+es,b:en+es', partition: random}",
    "{name: x, kind: centralized, sites: 'a:en+es,b:en+es', partition: dealt}",
    "{name: x, kind: federated, partition: dealt}",
])
def test_a_partition_is_dealt_to_a_federated_variants_own_sites(tmp_path, variant):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"variants:\n  - {variant}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*partition"):
        load_suite(str(bad))
