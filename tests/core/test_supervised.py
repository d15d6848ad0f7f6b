"""The supervised reference: the image encoder trained on the labels, scored on the held-out split."""

from __future__ import annotations

import json

from medunic_core.cli import main
from medunic_core.constants import FINDINGS
from medunic_core.data.manifest import read_manifest


def test_the_supervised_reference_trains_on_the_train_labels_and_scores_the_held_out_split(
        synthetic_data, train_overrides, tmp_path, capsys):
    out = tmp_path / "sup"
    assert main(["supervised", "--no-progress", "--out", str(out), *train_overrides(synthetic_data, tmp_path / "x")]) == 0
    res = json.loads((out / "supervised.json").read_text())
    rows = read_manifest(synthetic_data)
    assert res["n_train"] == sum(r.split == "train" for r in rows) and res["n_test"] == sum(r.split == "test" for r in rows)
    assert res["steps"] == 6 and res["train_loss"] > 0
    assert set(res["per_finding"]) <= set(FINDINGS) and 0 <= res["macro_auc"] <= 1
    assert "| **macro** |" in capsys.readouterr().out


def test_a_finding_without_labels_is_left_out_of_the_loss_and_the_score(synthetic_data, train_overrides, tmp_path):
    # every row lacks 'edema' (unknown, not absent): a loss over it would be NaN and stop the run
    manifest = tmp_path / "manifest.jsonl"
    lines = []
    for line in synthetic_data.read_text().splitlines():
        row = json.loads(line)
        row["image_path"] = str((synthetic_data.parent / row["image_path"]).resolve())
        row["labels"].pop("edema")
        lines.append(json.dumps(row))
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sup"
    assert main(["supervised", "--no-progress", "--out", str(out), *train_overrides(manifest, tmp_path / "x"),
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    res = json.loads((out / "supervised.json").read_text())
    assert "edema" not in res["per_finding"] and res["per_finding"] and res["train_loss"] > 0
