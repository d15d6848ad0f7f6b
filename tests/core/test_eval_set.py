"""The fixed bilingual evaluation set: one film, an EN and an ES report of the same findings,
and an evaluation that takes its held-out rows from it (``eval.manifest``)."""

from __future__ import annotations

import json

from medunic_core.cli import main
from medunic_core.config import load_config
from medunic_core.data.manifest import read_manifest
from medunic_core.data.synthetic.generator import generate_eval_set
from medunic_core.evaluation.run import evaluate
from medunic_core.train import train


def test_every_film_has_an_english_and_a_spanish_report_of_its_findings(tmp_path):
    cfg = load_config("tiny", ["synth.image_size=64"])
    manifest = generate_eval_set(cfg.synth, 12, tmp_path / "a", ["default", "highres"], progress=False)
    rows = read_manifest(manifest)
    assert len(rows) == 24 and {r.split for r in rows} == {"test"} and {r.site for r in rows} == {"eval"}
    cases: dict[str, list] = {}
    for r in rows:
        cases.setdefault(r.image_path, []).append(r)
    assert len(cases) == 12
    for pair in cases.values():
        assert sorted(r.lang for r in pair) == ["en", "es"] and pair[0].labels == pair[1].labels
        assert pair[0].report != pair[1].report and all(r.report for r in pair)
    assert sum(1 for pair in cases.values() if pair[0].finding_set) > 0  # not all normal
    # the same command writes the same set; it shares no film with the training sites
    again = generate_eval_set(cfg.synth, 12, tmp_path / "b", ["default", "highres"], progress=False)
    strip = lambda p: [{**json.loads(x), "image_path": ""} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(manifest) == strip(again)


def test_synth_writes_the_set_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "evalset"
    assert main(["synth", "--no-progress", "--eval-set", "5", "--out", str(out), "--workers", "1",
                 "synth.image_size=64"]) == 0
    assert len(read_manifest(out / "manifest.jsonl")) == 10
    out_text = capsys.readouterr().out
    assert "wrote 10 records" in out_text
    assert [line.split() for line in out_text.splitlines() if line.startswith("eval ")] == [
        ["eval", "en", "0", "0", "5", "5"], ["eval", "es", "0", "0", "5", "5"]]  # films per language


def test_an_evaluation_takes_its_held_out_rows_from_the_fixed_set(synthetic_data, train_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", train_overrides(synthetic_data, run, "train.max_steps=2")), progress=False)
    cfg = load_config("tiny", ["synth.image_size=128"])
    evalset = generate_eval_set(cfg.synth, 30, tmp_path / "evalset", ["default", "portable"], progress=False)
    results = evaluate(run, tmp_path / "eval", [f"eval.manifest={evalset}", "eval.tsne=false", "eval.probe_seeds=[0]",
                                                "eval.probe_fractions=[1.0]", "align.eval_norm=community"],
                       progress=False)
    assert results["meta"]["n_test"] == 60  # the set's rows, not the training data's test split
    assert results["retrieval"]["en->es"]["n_excluded"] == 0  # every query has its own case to find
    assert results["meta"]["n_train"] > 0  # the probe and the community statistics still use the training rows
    # the image and report embeddings are probed too: trained on the training rows, scored on the set's
    assert results["text_probe"]["n_train"]["edema"] == results["meta"]["n_train"]
    assert results["image_embedding_probe"]["n_train"]["edema"] == results["meta"]["n_train"]
    # zero-shot with each language's training reports in place of its prompts, beside the prompts'
    assert set(results["report_zeroshot"]) == set(results["zeroshot"]) == {"en", "es"}
    assert set(results["report_zeroshot"]["es"]["auc"]) <= set(results["zeroshot"]["es"]["auc"])
    report = (tmp_path / "eval" / "eval.md").read_text()
    assert "| reports (P_l) |" in report and "| images (P_V) |" in report
    assert "| lang (reports) |" in report
    # the shipped prompts use words the tiny synthetic reports never write ("cm", "opacidad"):
    # named per language, prompt and word, in the JSON and in eval.md
    unseen = results["unseen_prompt_words"]
    assert set(unseen) == {"en", "es"} and "cm" in unseen["es"]["nodule.positive"]["nódulo pulmonar de 1 cm"]
    assert "| es | nodule.positive | nódulo pulmonar de 1 cm |" in report
