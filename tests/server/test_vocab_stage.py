"""The vocabulary stage as a federated run: what a site sends, and the tokenizer built."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Message, RecordDict

from medunic_core.federation.runconfig import load_run_config
from medunic_core.data.manifest import read_manifest
from medunic_core.vocab import build_tokenizer, document_frequencies, load_tokenizer, vocabulary_words
from server.stages import VOCAB_SUMMARY, Federation, VocabStage
from tests.inprocess import InProcessGrid


def _site_words(manifest, site: str, cfg) -> dict:
    split = vocabulary_words(cfg.vocab, cfg.model.text.max_length)
    reports = [r.report for r in read_manifest(manifest, None, split="train") if r.site == site]
    return document_frequencies(reports, split)


def test_rare_words_never_leave_a_site(run_config, synthetic_data):
    rc = run_config("vocab.min_df=3")
    cfg = load_run_config(rc)
    request = Message(RecordDict({"config": ConfigRecord({"stage": "vocab"})}), message_type="query.vocab",
                      dst_node_id=2)
    reply = InProcessGrid(rc).send_and_receive([request])[0]  # partition 1: es-1
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"site", "vocab.es"}
    sent = reply.content["vocab.es"]
    words, df = list(sent["words"]), list(sent["df"])
    truth = _site_words(synthetic_data, "es-1", cfg)
    rare = {w for w, n in truth.items() if n < 3}
    assert rare and not rare & set(words)  # the site has rare words; none is in the message
    # ... nor anywhere else in what the site sends
    everything = " ".join(str(v) for rec in reply.content.config_records.values() for v in rec.values())
    assert not any(f"'{w}'" in everything for w in rare)
    assert dict(zip(words, df)) == {w: n for w, n in truth.items() if n >= 3}
    assert sent["reports"] == sum(1 for r in read_manifest(synthetic_data, None, split="train") if r.site == "es-1")


def test_vocabulary_stage_builds_the_runs_tokenizer(run_config, tmp_path, synthetic_data):
    # extend mode: the federated result equals the centralized one when no word falls below
    # a site's min_df that the pooled corpus would keep (min_df=1)
    base = tmp_path / "base"
    build_tokenizer(load_run_config(run_config()).vocab, [("the heart is normal size", "en")] * 2, base)
    rc = run_config(f"vocab.base={base}", "vocab.min_df=1", "vocab.max_new_tokens=40")
    cfg = load_run_config(rc)
    folder = VocabStage(Federation.from_run_config(rc)).run(InProcessGrid(rc))
    summary = json.loads((folder.parent / VOCAB_SUMMARY).read_text())
    assert set(summary["sites"]) == {"en-1", "es-1"} and set(summary["words_received"]) == {"es"}
    records = read_manifest(synthetic_data, None, split="train")
    central = build_tokenizer(cfg.vocab, [(r.report, r.lang) for r in records], tmp_path / "central")
    federated = load_tokenizer(folder, expected_sha256=summary["sha256"])
    assert federated.get_vocab() == central.get_vocab() and len(federated) == len(load_tokenizer(base)) + 40


def test_vocabulary_stage_trains_wordpiece_without_a_base(run_config, synthetic_data):
    rc = run_config("vocab.vocab_size=300", "vocab.min_df=2")
    folder = VocabStage(Federation.from_run_config(rc)).run(InProcessGrid(rc))
    tokenizer = load_tokenizer(folder)
    stats = json.loads((folder / "vocab_stats.json").read_text())
    assert stats["mode"] == "train" and stats["federated"] and 200 <= len(tokenizer) <= 300
    reports = [r.report for r in read_manifest(synthetic_data, None, split="train")]
    ids = [i for text in reports for i in tokenizer(text)["input_ids"]]
    assert ids.count(tokenizer.unk_token_id) / len(ids) < 0.01  # rare words still split into known pieces


def test_a_site_of_both_languages_sends_each_languages_counts(run_config, synthetic_data, tmp_path):
    """One site holding en-1's and es-1's reports (en+es) sends the counts of each language,
    per language as two sites would: the tokenizer is the same."""
    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    manifest = synthetic_data.parent / "mix-1-vocab.jsonl"  # beside it: image paths stay valid
    manifest.write_text("".join(json.dumps({**r, "site": "mix-1"}) + "\n" for r in rows))
    two = run_config("vocab.vocab_size=300", "vocab.min_df=2")
    one = run_config("vocab.vocab_size=300", "vocab.min_df=2", f"data.manifest={manifest}",
                     f"fed.out_dir={tmp_path / 'mixed'}")
    one["sites"] = "mix-1:en+es"
    by_language = load_tokenizer(VocabStage(Federation.from_run_config(two)).run(InProcessGrid(two)))
    folder = VocabStage(Federation.from_run_config(one)).run(InProcessGrid(one, num_nodes=1))
    summary = json.loads((folder.parent / VOCAB_SUMMARY).read_text())
    train = read_manifest(synthetic_data, None, split="train")
    assert summary["sites"] == {"mix-1": {lang: sum(r.lang == lang for r in train) for lang in ("en", "es")}}
    assert load_tokenizer(folder).get_vocab() == by_language.get_vocab()
