"""Label-only manifests (CheXpert, RSNA, SIIM: no reports): evaluation scores zero-shot and
the probe on them, skips the report metrics, and training still refuses them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from medunic_core.config import load_config
from medunic_core.data.manifest import parse_manifest, read_manifest, write_manifest
from medunic_core.errors import ConfigError, SiteDataError
from medunic_core.evaluation.run import evaluate
from medunic_core.train import train


def _blank_reports(manifest: Path, out: Path) -> Path:
    """The synthetic manifest with every report emptied: a label-only dataset."""
    records = read_manifest(manifest)
    return write_manifest([dataclasses.replace(r, report="") for r in records], out / "manifest.jsonl")


def test_read_manifest_refuses_empty_reports_unless_label_only(synthetic_data, tmp_path):
    label_only = _blank_reports(synthetic_data, tmp_path)
    with pytest.raises(SiteDataError, match="empty report"):
        read_manifest(label_only)
    records = read_manifest(label_only, require_report=False)
    assert len(records) == len(read_manifest(synthetic_data)) and all(r.report == "" for r in records)
    assert any(r.labels for r in records)


def test_parse_manifest_label_only_turns_nan_into_empty_and_checks_the_rest(tmp_path):
    rows = [
        {"id": "a", "image_path": "a.png", "report": "nan", "lang": "en", "split": "test", "labels": {"edema": 1}},
        {"id": "b", "image_path": "b.png", "lang": "en", "split": "test"},  # no report field at all
        {"id": "c", "image_path": "c.png", "report": "", "lang": "xx", "split": "test"},
        {"id": "a", "image_path": "d.png", "report": "", "lang": "en", "split": "test"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, problems = parse_manifest(path, require_report=False)
    assert [(r.id, r.report) for r in records] == [("a", ""), ("b", "")]
    assert [(p.id, p.message.split(" ")[0]) for p in problems] == [("c", "language"), ("a", "duplicate")]
    _, strict = parse_manifest(path)
    assert [p.id for p in strict] == ["a", "b", "c", "a"] and all("empty report" in p.message for p in strict)


def test_eval_on_label_only_manifest_scores_zeroshot_and_skips_retrieval(synthetic_data, train_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", train_overrides(synthetic_data, run, "train.max_steps=2")), progress=False)
    label_only = _blank_reports(synthetic_data, tmp_path / "label-only")
    overrides = [f"data.manifest={label_only}", "align.eval_norm=global", "eval.probe_seeds=[0]",
                 "eval.probe_fractions=[1.0]"]
    results = evaluate(run, tmp_path / "eval", overrides, progress=False)
    assert set(results["zeroshot"]) == {"en", "es"}
    for lang in ("en", "es"):
        assert 0.0 <= results["zeroshot"][lang]["macro_auc"] <= 1.0
    assert results["meta"]["n_test"] > 0 and results["meta"]["n_test_reports"] == 0
    assert "retrieval" not in results and "bias" not in results and "tsne" not in results
    assert 0.0 <= results["linear_probe"][1.0]["mean"] <= 1.0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "retrieval" not in saved and not (tmp_path / "eval" / "tsne_text.png").exists()
    # labels that are not FINDINGS (RSNA's pneumonia) are kept but not scored: nothing to score, no crash
    records = read_manifest(label_only, require_report=False)
    rsna_like = write_manifest([dataclasses.replace(r, labels={"pneumonia": int(bool(r.labels.get("consolidation")))})
                                for r in records], tmp_path / "rsna-like" / "manifest.jsonl")
    other = evaluate(run, tmp_path / "eval-rsna", [f"data.manifest={rsna_like}", *overrides[1:]], progress=False)
    assert other["zeroshot"]["en"]["macro_auc"] is None and len(other["zeroshot"]["en"]["skipped"]) == 6
    # community normalisation needs reports (or a federated export's statistics): said, not crashed
    with pytest.raises(ConfigError, match="label-only"):
        evaluate(run, tmp_path / "eval2", [f"data.manifest={label_only}", "align.eval_norm=community"],
                 progress=False)
