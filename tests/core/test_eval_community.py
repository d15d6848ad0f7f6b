"""``align.eval_norm=community`` on a model trained on one language: the other language has
no community statistics, so its reports are normalised globally, and the evaluation says so."""

from __future__ import annotations

import json

from medunic_core.config import load_config
from medunic_core.evaluation.run import evaluate
from medunic_core.train import train


def test_a_language_without_statistics_is_normalised_globally_and_said(synthetic_data, train_overrides, tmp_path):
    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    english = synthetic_data.parent / "en-only.jsonl"  # beside it: image paths stay valid
    english.write_text("".join(json.dumps(r) + "\n" for r in rows if r["lang"] == "en"))
    run = tmp_path / "run"
    train(load_config("tiny", train_overrides(english, run, "train.max_steps=2")), progress=False)
    results = evaluate(run, tmp_path / "eval", ["align.eval_norm=community", "eval.tsne=false",
                                                "eval.probe_seeds=[0]", "eval.probe_fractions=[1.0]"], progress=False)
    assert results["norm"] == {"en": "community", "es": "global"}
    assert 0.0 <= results["zeroshot"]["es"]["macro_auc"] <= 1.0  # scored, not a traceback
    assert "es global" in (tmp_path / "eval" / "eval.md").read_text()
    assert set(results["heldout_loss"]) >= {"cvl_loss", "ssv_loss", "loss"}
