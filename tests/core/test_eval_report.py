"""Evaluation reports: files written, tables present, t-SNE plot, run comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medunic_core.evaluation.bias import community_bias
from medunic_core.evaluation.report import (
    compare_table,
    plot_tsne,
    summary_metrics,
    write_comparison,
    write_eval_report,
)
from medunic_core.evaluation.retrieval import cross_lingual_retrieval
from medunic_core.evaluation.zeroshot import zeroshot_metrics


def _results(shift: float, seed: int = 0) -> dict:
    """A complete results dict built by the real metric functions on random embeddings."""
    rng = np.random.default_rng(seed)
    n, findings = 40, ["edema", "nodule"]
    labels = rng.integers(0, 2, size=(n, 2)).astype(float)
    labels[0, 1] = np.nan
    signal = np.hstack([np.nan_to_num(labels) * 2 - 1, np.zeros((n, 2))])
    images = signal + 0.8 * rng.normal(size=(n, 4))
    pos, neg = np.hstack([np.eye(2), np.zeros((2, 2))]), np.hstack([-np.eye(2), np.zeros((2, 2))])
    langs = ["en"] * (n // 2) + ["es"] * (n // 2)
    text = images + np.array([0, 0, shift, 0]) * (np.array(langs) == "es")[:, None]
    sets = [frozenset(f for f, v in zip(findings, row) if v == 1) for row in labels]
    return {
        "meta": {"run": f"shift-{shift}", "split": "test", "n_reports": {"en": 20, "es": 20}},
        "zeroshot": {lang: zeroshot_metrics(images, pos, neg, labels, 0.07, findings)
                     for lang in ("en", "es")},
        "retrieval": cross_lingual_retrieval(text, langs, sets, ks=(1, 5)),
        "bias": {"text": community_bias(text, langs)},
        "linear_probe": {
            0.1: {"mean": 0.7, "std": 0.05, "per_seed": [0.65, 0.75],
                  "notes": ["nodule: 2 per class enforced at fraction 0.1"]},
            1.0: {"mean": 0.9, "std": 0.0, "per_seed": [0.9, 0.9], "notes": []},
        },
        "tsne": {"text": "tsne_text.png"},
    }


def test_write_eval_report_writes_json_and_markdown_tables(tmp_path: Path) -> None:
    results = _results(shift=0.5)
    json_path, md_path = write_eval_report(results, tmp_path / "eval")
    data = json.loads(json_path.read_text())
    assert set(data) == {"meta", "zeroshot", "retrieval", "bias", "linear_probe", "tsne"}
    assert data["linear_probe"]["0.1"]["per_seed"] == [0.65, 0.75]
    expected_auc = results["zeroshot"]["en"]["auc"]["edema"]
    assert data["zeroshot"]["en"]["auc"]["edema"] == pytest.approx(expected_auc)
    md = md_path.read_text()
    for heading in ("## Zero-shot classification", "## Cross-lingual retrieval",
                    "## Community bias", "## Linear probe", "## t-SNE (text)"):
        assert heading in md
    assert "| lang | macro AUC | macro F1 | accuracy | AUC edema | AUC nodule |" in md
    assert "| direction | R@1 | chance@1 | R@5 | chance@5 | queries | excluded |" in md
    assert "| en->es |" in md and "| es->en |" in md and "| mean |" in md
    assert "| 10% | 0.700 | 0.050 | 0.650, 0.750 |" in md
    assert "- nodule: 2 per class enforced at fraction 0.1" in md


def test_eval_report_tolerates_missing_sections_and_nan(tmp_path: Path) -> None:
    results = {"bias": {"text": {"silhouette_lang": float("nan")}}}
    json_path, md_path = write_eval_report(results, tmp_path)
    assert json.loads(json_path.read_text())["bias"]["text"]["silhouette_lang"] is None
    md = md_path.read_text()
    assert "## Community bias" in md and "## Zero-shot" not in md and "n/a" in md


def test_plot_tsne_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = np.vstack([rng.normal(size=(25, 8)) + 3, rng.normal(size=(25, 8)) - 3])
    langs = ["en"] * 25 + ["es"] * 25
    sets = [frozenset({"edema"}) if i % 2 else frozenset() for i in range(50)]
    path = plot_tsne(emb, langs, tmp_path / "plots" / "tsne.png", labels=sets, seed=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    tiny = plot_tsne(emb[:4], langs[:4], tmp_path / "tiny.png")  # perplexity adapted to N
    assert tiny.stat().st_size > 0


def test_summary_metrics_leads_with_retrieval() -> None:
    summary = summary_metrics(_results(shift=0.5))
    keys = list(summary)
    assert keys[0] == "retrieval/en->es/R@1"
    assert "retrieval/mean/chance@5" in summary
    assert "retrieval/en->es/chance@1" not in summary
    assert "bias/text/silhouette_lang" in summary
    assert "zeroshot/es/macro_auc" in summary
    assert 0.5 < summary["zeroshot/en/auc/edema"] <= 1 and "zeroshot/es/auc/nodule" in summary  # per finding too
    assert summary["linear_probe/100%/macro_auc"] == 0.9


def test_the_finding_table_shows_a_ranking_that_turns_over_in_one_seed(tmp_path: Path) -> None:
    """A macro zero-shot AUC swings between seeds when one finding's ranking turns over
    (its positive and negative prompts swap sides) in some seeds: the suites' compare.md
    shows each finding's range over seeds."""
    seeds = [_results(0.0, seed=s) for s in range(3)]
    flipped = seeds[2]["zeroshot"]["en"]["auc"]
    flipped["edema"] = 1 - flipped["edema"]
    md_path, json_path = write_comparison({"federated": seeds}, tmp_path, by_run=True)
    row = next(line for line in md_path.read_text().splitlines() if line.startswith("| federated | en |"))
    edema = json.loads(json_path.read_text())["runs"]["federated"]["zeroshot/en/auc/edema"]["values"]
    low, high = min(edema), max(edema)
    assert low < 0.5 < high and f"({low:.2f}-{high:.2f}, 1 below 0.5)" in row.split(" | ")[2]
    one = write_comparison({"one": seeds[0]}, tmp_path / "one", by_run=True)[0].read_text()
    assert "(" not in next(line for line in one.splitlines() if line.startswith("| one | en |"))  # one seed: no range


def test_compare_table_has_a_column_per_run_and_aggregates_seeds(tmp_path: Path) -> None:
    runs = {"centralized": _results(0.0), "federated": [_results(2.0, seed=s) for s in range(3)],
            "partial": {"bias": {"text": {"silhouette_lang": 0.4}}}}
    table = compare_table(runs)
    assert table.splitlines()[0] == "| metric | centralized | federated | partial |"
    assert "(n=3)" in table and "±" in table
    row = next(l for l in table.splitlines() if l.startswith("| bias/text/silhouette_lang |"))
    assert row.rstrip().endswith("| 0.400 |")
    assert "| retrieval/mean/R@1 |" in table and "| zeroshot/en/macro_auc |" in table
    md_path, json_path = write_comparison(runs, tmp_path)
    assert table in md_path.read_text()
    data = json.loads(json_path.read_text())
    assert set(data["runs"]) == set(runs)
    assert len(data["runs"]["federated"]["retrieval/mean/R@1"]["values"]) == 3
    assert data["runs"]["partial"]["retrieval/mean/R@1"]["mean"] is None
