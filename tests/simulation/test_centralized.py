"""End to end through the CLI: demo (train + eval) and the CTR on/off comparison."""

from __future__ import annotations

import json

import pytest

from medunic_core.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _small(synthetic_data, train_overrides, out_dir) -> list[str]:
    return [
        *train_overrides(synthetic_data, out_dir),
        "eval.probe_seeds=[0]",
        "eval.tsne=true",
    ]


def test_demo_trains_and_writes_an_evaluation_report(synthetic_data, train_overrides, tmp_path, capsys):
    rc = main(["demo", "--no-progress", *_small(synthetic_data, train_overrides, tmp_path / "run")])
    assert rc == 0
    report = tmp_path / "run" / "eval"
    results = json.loads((report / "eval.json").read_text())
    assert set(results["zeroshot"]) == {"en", "es"}
    for lang in ("en", "es"):
        assert 0.0 <= results["zeroshot"][lang]["macro_auc"] <= 1.0
    assert results["retrieval"]["en->es"]["n_queries"] > 0
    assert {"text", "encoder"} <= set(results["bias"])
    assert (report / "tsne_text.png").stat().st_size > 1000
    assert "Cross-lingual retrieval" in capsys.readouterr().out


def test_compare_puts_ctr_and_no_ctr_side_by_side(synthetic_data, train_overrides, tmp_path):
    out = tmp_path / "compare"
    rc = main(
        ["compare", "--no-progress", "--seeds", "1", "--out", str(out),
         *_small(synthetic_data, train_overrides, tmp_path / "unused"), "eval.tsne=false"]
    )
    assert rc == 0
    table = (out / "compare.md").read_text()
    assert "| metric | ctr | no-ctr |" in table
    assert "silhouette" in table and "R@1" in table
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert set(runs) == {"ctr", "no-ctr"}
    # Both variants trained on the same data with the same budget.
    metrics = [json.loads(line) for line in (out / "ctr" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (out / "no-ctr" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == plain[-1]["step"]
    assert "tf_loss" in metrics[-1] and "tf_loss" not in plain[-1]
