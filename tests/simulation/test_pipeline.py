"""`medunic pipeline`: vocab -> mlm -> vlp (local, mixed) -> eval as real Flower runs on
the public-text federation (PadChest Spanish and Open-i English report text)."""

from __future__ import annotations

import json

import pytest

from medunic_core.cli import main
from medunic_core.data.public_text import torchxrayvision_data
from medunic_core.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_pipeline_on_the_public_text_federation(tmp_path, monkeypatch):
    try:
        torchxrayvision_data()
    except ConfigError as exc:  # `make test-slow` installs it (make public-text)
        pytest.skip(str(exc))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(tmp_path)  # data/ of the run lands here
    out = tmp_path / "pipeline"
    rc = main([
        "pipeline", "--no-progress", "--pairs-per-site", "80", "--mlm-rounds", "2", f"fed.out_dir={out}",
        "fed.rounds=2", "fed.local_steps=2", "train.batch_size=8", "train.warmup_steps=1", "mlm.batch_size=8",
        "mlm.warmup_steps=1", "model.image.kwargs.depth=2", "model.text.num_layers=2", "eval.probe_fractions=[1.0]",
        "eval.probe_seeds=[0]", "eval.tsne=false",
    ])
    assert rc == 0
    results = json.loads((out / "pipeline.json").read_text())
    assert set(results["vocab"]["sites"]) == {"en-1", "es-1"} and results["vocab"]["vocab_size"] > 100
    assert len(results["mlm"]) == 2 and all(r["train_mlm_loss"] > 0 for r in results["mlm"])
    assert 0 <= results["after_mlm"]["lang_id_probe_acc"] <= 1
    for variant in ("local", "mixed"):
        res = results[f"vlp-{variant}"]
        assert set(res["zeroshot"]) == {"en", "es"} and "R@5" in res["retrieval"]["mean"]
        rows = [json.loads(x) for x in (out / f"vlp-{variant}" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
    # every stage used the vocabulary the vocab stage built
    sha = results["vocab"]["sha256"]
    assert (out / "mlm" / "tokenizer" / "vocab.sha256").read_text().strip() == sha
    report = (out / "report.md").read_text()
    assert "after MLM only" in report and "VLP federated-mixed" in report and "silhouette" in report
    assert (out / "bias.png").stat().st_size > 1000
