"""The federation layer without Flower: run config, reply validation, aggregation math."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from medunic_core.align import alignment_layout
from medunic_core.config import load_config
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError, SiteDataError
from medunic_core.federation import payload as P
from medunic_core.federation.aggregate import fill_unused_rows, outliers, update_norms
from medunic_core.federation.replies import (
    Content,
    InvalidReply,
    Sent,
    check_alignment,
    check_train_reply,
    check_vocab_reply,
)
from medunic_core.federation.runconfig import load_run_config, parse_site_specs, run_overrides, stage_overrides
from medunic_core.federation.stages import VLP, stage_model
from medunic_core.local import site_records, train_site
from medunic_core.vocab import load_tokenizer


# -- run config ---------------------------------------------------------------------------
def test_sites_are_written_one_way_with_optional_synthetic_size_and_profile():
    sites = parse_site_specs("en-1:en,es-1:es:200,en-2:en:50:lowdose")
    assert [(s.name, s.lang, s.n, s.profile) for s in sites] == [
        ("en-1", "en", 400, "default"), ("es-1", "es", 200, "highres"), ("en-2", "en", 50, "lowdose")]
    mixed = parse_site_specs("mix-1:es+en:100,mix-2:en+es")
    assert [(s.name, s.lang, s.n, s.profile) for s in mixed] == [("mix-1", "en+es", 100, "default"),
                                                                   ("mix-2", "en+es", 400, "portable")]
    for bad in ("en:2,es:1", "fr-1:fr", "en-1:en,en-1:en", "en-1:en:many", "", "m:en+fr", "m:en+en", "m:en,es"):
        with pytest.raises(ConfigError):
            parse_site_specs(bad)


def test_readable_run_config_keys_become_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = run_overrides({"rounds": 3, "local-steps": 0, "out": "runs/x", "tokenizer": "",
                               "overrides": "train.lr=1e-3 'data.langs=[en,es]'"})
    assert overrides == ["fed.rounds=3", f"fed.out_dir={tmp_path / 'runs' / 'x'}", "train.lr=1e-3",
                         "data.langs=[en,es]"]
    assert run_overrides({"overrides": json.dumps(["loss.ctr=false"])}) == ["loss.ctr=false"]  # a JSON list too
    cfg = load_run_config({"preset": "tiny", "rounds": 3, "overrides": "train.lr=1e-3"})
    assert cfg.fed.rounds == 3 and cfg.train.lr == 1e-3
    with pytest.raises(ConfigError, match="rounds"):
        run_overrides({"rounds": -1})


def test_a_run_config_cannot_read_a_sites_environment_or_files(tmp_path, monkeypatch):
    """The attack: the coordinator's run config says eval.split=${oc.env:SECRET,test}; at
    the coordinator SECRET is unset so the run starts, at the site it resolves to the
    secret, and the site's error ("no '<secret>' rows") travels back in the error reply.
    Or its preset names a YAML file anywhere on the site's disk. Both are refused."""
    monkeypatch.setenv("MEDUNIC_TEST_SECRET", "hunter2")
    assert OmegaConf.from_dotlist(["a=${oc.env:MEDUNIC_TEST_SECRET,test}"]).a == "hunter2"  # what it would do
    for overrides in ("eval.split=${oc.env:MEDUNIC_TEST_SECRET,test}", json.dumps(["train.lr=${oc.env:HOME}"]),
                      "'data.langs=[en,${oc.env:MEDUNIC_TEST_SECRET}]'"):
        with pytest.raises(ConfigError, match="interpolations"):
            load_run_config({"preset": "tiny", "overrides": overrides})
    with pytest.raises(ConfigError, match="interpolations"):
        load_run_config({"preset": "tiny", "out": "runs/${oc.env:MEDUNIC_TEST_SECRET}"})
    elsewhere = tmp_path / "evil.yaml"
    elsewhere.write_text("train:\n  lr: 0.5\n")
    for preset in (str(tmp_path / "evil"), "../../" + str(tmp_path / "evil"), "presets/tiny"):
        with pytest.raises(ConfigError, match="unknown preset"):
            load_run_config({"preset": preset})


def test_stage_overrides_may_set_only_what_a_simulation_stages():
    assert stage_overrides(json.dumps(["train.tokenizer=/t", "fed.rounds=3"])) == ["train.tokenizer=/t", "fed.rounds=3"]
    assert stage_overrides(None) == []
    with pytest.raises(ConfigError, match="may set only"):
        stage_overrides(json.dumps(["dp.updates.enabled=false"]))


# -- replies --------------------------------------------------------------------------------
def test_the_alignment_layout_is_what_a_site_round_sends(synthetic_data, fed_tokenizer, train_overrides, tmp_path):
    """The coordinator validates alignment records against alignment_layout: it must be
    exactly the keys and shapes a real round collects (CTR on, P_V too with align.image)."""
    for extra in ([], ["align.image=true"], ["loss.ctr=false"]):
        cfg = load_config("tiny", [*train_overrides(synthetic_data, tmp_path / "c"), "fed.local_steps=1",
                                   "fed.rounds=1", *extra])
        tok = load_tokenizer(fed_tokenizer)
        model = stage_model(cfg, tok, VLP)
        records = site_records(cfg, "en-1", "en", "train", str(synthetic_data))
        result = train_site(model, records, ImageCache(tmp_path / "cache", cfg.model.image.cache_size), tok, cfg, 1)
        flat = {k.split("/", 1)[1]: v for k, v in result.alignment.to_flat().items()}
        layout = alignment_layout(model, cfg.loss.ctr, cfg.align.image)
        assert {k: v.shape for k, v in flat.items()} == layout, extra
        check_alignment(result.alignment.to_flat(), "en", layout, 1000)  # a real record passes


def test_a_site_of_both_languages_sends_the_sums_of_each_and_only_of_its_own(synthetic_data, fed_tokenizer,
                                                                             train_overrides, tmp_path):
    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    manifest = synthetic_data.parent / "mix-1-federation.jsonl"  # beside it: image paths stay valid
    manifest.write_text("".join(json.dumps({**r, "site": "mix-1"}) + "\n" for r in rows))
    cfg = load_config("tiny", [*train_overrides(manifest, tmp_path / "c"), "fed.local_steps=1", "fed.rounds=1"])
    with pytest.raises(SiteDataError, match="declared 'en' but .* es-1-"):  # the rows name the row ids
        site_records(cfg, "mix-1", "en", "train")
    tok = load_tokenizer(fed_tokenizer)
    model = stage_model(cfg, tok, VLP)
    records = site_records(cfg, "mix-1", "en+es", "train")
    result = train_site(model, records, ImageCache(tmp_path / "cache", cfg.model.image.cache_size), tok, cfg, 1)
    assert result.alignment.communities == ["en", "es"]
    flat, layout = result.alignment.to_flat(), alignment_layout(model, cfg.loss.ctr, cfg.align.image)
    checked = check_alignment(flat, "en+es", layout, cfg.train.batch_size)
    assert sum(checked.count(c) for c in checked.communities) == cfg.train.batch_size
    with pytest.raises(InvalidReply, match="not of the site's community 'en'"):
        check_alignment(flat, "en", layout, 1000)  # an English site may not speak for Spanish
    only_en = {k: v for k, v in flat.items() if k.startswith("en/")}
    assert check_alignment(only_en, "en+es", layout, 1000).communities == ["en"]  # a batch without Spanish
    with pytest.raises(InvalidReply, match="add up to"):
        check_alignment(flat, "en+es", layout, cfg.train.batch_size - 1)
    for community in ("en+fr", "es+es", ""):
        with pytest.raises(InvalidReply, match="not a language"):
            check_alignment(flat, community, layout, 1000)


def _content(**arrays) -> Content:
    return Content(arrays={P.ARRAYS: arrays.pop("weights"), **arrays},
                   metrics={P.METRICS: {P.NUM_EXAMPLES: 8, "train_loss": 1.0}},
                   configs={P.SITE: {P.SITE_NAME: "en-1", P.COMMUNITY: "en"}})


def test_a_train_reply_fits_what_was_sent_or_is_refused_with_the_reason():
    sent = Sent({"w": (2, 3)}, "float16", max_examples=8, token_rows=4)
    usage = {P.TOKEN_ROWS: np.array([1, 0, 1, 0], np.uint8)}
    ok = check_train_reply(_content(weights={"w": np.ones((2, 3), np.float16)}, usage=usage), sent, "en")
    assert ok.arrays["w"].dtype == np.float32 and ok.num_examples == 8 and ok.token_rows.tolist() == [1, 0, 1, 0]
    for weights, reason in (({"w": np.ones((1, 3), np.float16)}, "shape"), ({"w": np.ones((2, 3))}, "dtype"),
                            ({"w": np.full((2, 3), np.inf, np.float16)}, "not finite"), ({}, "missing")):
        with pytest.raises(InvalidReply, match=reason):
            check_train_reply(_content(weights=weights, usage=usage), sent, "en")
    with pytest.raises(InvalidReply, match="unexpected record"):
        check_train_reply(_content(weights={"w": np.ones((2, 3), np.float16)}, usage=usage, extra={}), sent, "en")


def test_a_negative_batchnorm_variance_is_refused_however_small_the_update():
    """The attack: a site returns the weights it received, one running variance set to -3
    (update norm 4, far inside the outlier limit); averaged in, sqrt(var + eps) is NaN in
    every later evaluation. The reply is refused; a zero variance is still a variance."""
    name = "image_proj.bn.running_var"
    sent = Sent({"w": (2, 3), name: (4,)}, "float16", max_examples=8, token_rows=4)
    usage = {P.TOKEN_ROWS: np.array([1, 0, 1, 0], np.uint8)}
    weights = {"w": np.ones((2, 3), np.float16), name: np.array([1.0, 0.0, 2.0, 1.0], np.float16)}
    assert check_train_reply(_content(weights=weights, usage=usage), sent, "en").arrays[name].min() == 0.0
    weights[name] = np.array([1.0, -3.0, 2.0, 1.0], np.float16)
    with pytest.raises(InvalidReply, match="running_var: a BatchNorm variance below 0"):
        check_train_reply(_content(weights=weights, usage=usage), sent, "en")


def test_a_vocabulary_reply_keeps_rare_words_out_and_counts_within_reports():
    def reply(words, df, reports=10):
        return Content(configs={P.SITE: {P.SITE_NAME: "es-1", P.COMMUNITY: "es"},
                                f"{P.VOCAB_PREFIX}es": {P.WORDS: words, P.DF: df, P.REPORTS: reports}})

    assert check_vocab_reply(reply(["derrame", "pleural"], [3, 4]), "es", ["en", "es"], 2, 100) == {
        "es": (Counter({"derrame": 3, "pleural": 4}), 10)}
    for words, df, reason in ((["raro"], [1], "outside"), (["a", "a"], [3, 3], "repeat"), (["a b"], [3], "spaces"),
                              (["x"], [11], "outside")):
        with pytest.raises(InvalidReply, match=reason):
            check_vocab_reply(reply(words, df), "es", ["en", "es"], 2, 100)
    with pytest.raises(InvalidReply, match="unexpected record"):  # a language the stage does not count
        check_vocab_reply(reply(["a"], [3]), "es", ["en"], 2, 100)


# -- aggregation ----------------------------------------------------------------------------
def test_fill_unused_rows_keeps_a_plain_weighted_mean_exact_without_editing_the_input():
    rng = np.random.default_rng(0)
    arrays = [{"emb": rng.normal(size=(5, 2))} for _ in range(3)]
    usage = [np.array([1, 1, 0, 0, 0]), np.array([0, 1, 1, 0, 0]), np.array([0, 1, 1, 1, 0])]
    weights = [1.0, 2.0, 3.0]
    original = [a["emb"].copy() for a in arrays]
    filled = fill_unused_rows(arrays, usage, weights, key="emb")
    assert all(np.array_equal(a["emb"], o) for a, o in zip(arrays, original))
    mean = sum(w * a["emb"] for w, a in zip(weights, filled)) / sum(weights)
    np.testing.assert_allclose(mean[2], (2 * original[1][2] + 3 * original[2][2]) / 5)
    np.testing.assert_allclose(mean[3], original[2][3])
    np.testing.assert_allclose(mean[4], sum(w * o[4] for w, o in zip(weights, original)) / sum(weights))


def test_outliers_and_norms():
    assert outliers([1.0, 1.2, 50.0], factor=10) == [2]
    assert outliers([1.0, float("inf")], factor=10) == [1]
    assert outliers([1.0, 3.0], factor=10) == []
    assert update_norms([{"a": np.array([3.0, 4.0])}], {"a": np.zeros(2)}) == [5.0]

