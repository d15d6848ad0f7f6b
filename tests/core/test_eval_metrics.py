"""Metric functions on hand-checkable embeddings: orientation, exclusions, chance levels."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medunic_core.constants import FINDINGS, LANGUAGES
from medunic_core.data.manifest import Record
from medunic_core.errors import ConfigError
from medunic_core.evaluation.bias import community_bias, mean_distance_over_spread
from medunic_core.evaluation.linear_probe import linear_probe, stratified_subsample
from medunic_core.evaluation.prompts import load_prompts, unseen_prompt_words
from medunic_core.evaluation.retrieval import chance_recall, cross_lingual_retrieval, recall_at_k
from medunic_core.evaluation.zeroshot import (
    class_embedding,
    label_matrix,
    report_class_embeddings,
    zeroshot_metrics,
    zeroshot_probs,
)

# --- prompts ---------------------------------------------------------------------------


def test_load_prompts_shipped_file_covers_every_language_and_finding() -> None:
    prompts = load_prompts()
    for lang in LANGUAGES:
        for finding in FINDINGS:
            sides = prompts[lang][finding]
            assert sides["positive"] and sides["negative"]
            assert set(sides["positive"]).isdisjoint(sides["negative"])


def test_load_prompts_missing_finding_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "en:\n  cardiomegaly:\n    positive: cardiomegaly\n    negative: no cardiomegaly\n"
    )
    with pytest.raises(ConfigError, match="language 'en' has no prompts for finding"):
        load_prompts(path, langs=["en"], findings=["cardiomegaly", "edema"])
    assert load_prompts(path, langs=["en"], findings=["cardiomegaly"])["en"]["cardiomegaly"] == {
        "positive": ["cardiomegaly"], "negative": ["no cardiomegaly"]}
    with pytest.raises(ConfigError, match=r"no prompts for language\(s\) \['es'\]"):
        load_prompts(path, langs=["en", "es"], findings=["cardiomegaly"])


def test_load_prompts_bad_side_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "prompts.yaml"
    path.write_text("en:\n  edema:\n    positve: [edema]\n    negative: [no edema]\n")
    with pytest.raises(ConfigError, match="en.edema: expected exactly the keys"):
        load_prompts(path, langs=["en"], findings=["edema"])


def test_unseen_prompt_words_names_the_words_no_report_of_the_language_uses(tmp_path: Path) -> None:
    from medunic_core.config import load_config
    from medunic_core.vocab import build_tokenizer, word_splitter

    reports = ["sin nódulos", "nódulo pulmonar de 12 mm en base derecha", "no se observan nódulos"] * 3
    cfg = load_config("tiny", ["vocab.vocab_size=120", "vocab.min_df=1"])
    tokenizer = build_tokenizer(cfg.vocab, [(r, "es") for r in reports], tmp_path / "tok", 32)
    # words as the tokenizer normalises them (accents stripped), whole even outside its vocabulary
    split_words = word_splitter(tokenizer)
    assert split_words("Nódulos pulmonares") == ["nodulos", "pulmonares"]
    prompts = {"nodule": {"positive": ["nódulo pulmonar", "opacidad redondeada"],
                          "negative": ["sin nódulos pulmonares"]}}
    assert unseen_prompt_words(prompts, reports, split_words) == {
        "nodule.positive": {"opacidad redondeada": ["opacidad", "redondeada"]},
        "nodule.negative": {"sin nódulos pulmonares": ["pulmonares"]},
    }
    assert unseen_prompt_words(prompts, reports + ["opacidad redondeada", "pulmonares"], split_words) == {}


# --- zero-shot -------------------------------------------------------------------------

# Two findings in 2-D: the positive prompt of each is one axis, the negative the other.
POS = np.array([[1.0, 0.0], [1.0, 0.0]])
NEG = np.array([[0.0, 1.0], [0.0, 1.0]])
IMAGES = np.array([[3.0, 0.1], [2.0, 0.5], [0.2, 1.0], [0.1, 4.0]])  # first two lean "present"
LABELS = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=float)


def test_zeroshot_probs_are_softmax_over_pos_and_neg_similarity() -> None:
    img = np.array([[0.6, 0.8]])
    probs = zeroshot_probs(img, POS[:1], NEG[:1], temperature=0.07)
    expected = math.exp(0.6 / 0.07) / (math.exp(0.6 / 0.07) + math.exp(0.8 / 0.07))
    assert probs.shape == (1, 1)
    assert probs[0, 0] == pytest.approx(expected)


def test_zeroshot_perfect_separation_gives_auc_f1_accuracy_one() -> None:
    labels = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=float)
    out = zeroshot_metrics(torch.tensor(IMAGES), POS, NEG, labels, 0.07, findings=["a", "b"])
    assert out["auc"] == {"a": 1.0, "b": 1.0}
    # the public Med-UniC code inverted the decision and would report 0.0 here
    assert out["macro_f1"] == 1.0
    assert out["accuracy"] == 1.0
    assert out["macro_auc"] == 1.0


def test_zeroshot_swapped_prompts_give_auc_and_accuracy_zero() -> None:
    labels = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=float)
    out = zeroshot_metrics(IMAGES, NEG, POS, labels, 0.07, findings=["a", "b"])
    assert out["macro_auc"] == 0.0
    assert out["accuracy"] == 0.0
    assert out["macro_f1"] == 0.0


def test_zeroshot_unknown_labels_are_ignored_and_single_class_findings_skipped() -> None:
    # finding "a": known labels 1, 1, 0 -> perfect; the contradicting 4th row is unknown (-1).
    # finding "b": only positives are known -> no AUC, left out of the macro means.
    images = np.array([[3.0, 0.1], [2.0, 0.5], [0.1, 4.0], [5.0, 0.0]])
    labels = np.array([[1, 1], [1, np.nan], [0, 1], [-1, np.nan]])
    out = zeroshot_metrics(images, POS, NEG, labels, 0.07, findings=["a", "b"])
    assert out["auc"] == {"a": 1.0, "b": None}
    assert out["skipped"] == ["b"]
    assert out["n"] == {"a": 3, "b": 2}
    assert (out["macro_auc"], out["macro_f1"], out["accuracy"]) == (1.0, 1.0, 1.0)


def test_zeroshot_mixed_example_matches_hand_count() -> None:
    # finding "b" (column 1): labels 1, 0, 1, 0; predictions present, present, absent, absent
    out = zeroshot_metrics(IMAGES, POS, NEG, LABELS, 1.0, findings=["a", "b"])
    assert out["acc"]["b"] == 0.5
    assert out["f1"]["b"] == 0.5  # tp=1, fp=1, fn=1
    # AUC over (positive, negative) pairs: (0,1), (0,3), (2,3) ranked right, (2,1) wrong
    assert out["auc"]["b"] == 0.75


def test_class_embedding_averages_normalised_prompts() -> None:
    emb = class_embedding(np.array([[2.0, 0.0], [0.0, 5.0]]))
    assert np.allclose(emb, [math.sqrt(0.5), math.sqrt(0.5)])


def test_report_class_embeddings_average_each_class_and_skip_one_class_findings() -> None:
    reports = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    # finding a: reports 0 and 3 state it; b: nobody states it (no direction); c: unknown in row 3
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, np.nan]])
    pos, neg, kept = report_class_embeddings(reports, labels, ["a", "b", "c"])
    assert kept == ["a", "c"]
    assert np.allclose(pos[0], class_embedding(reports[[0, 3]])) and np.allclose(neg[0], [0.0, 1.0])
    assert np.allclose(pos[1], [0.0, 1.0]) and np.allclose(neg[1], [1.0, 0.0])  # row 3 counts on neither side
    # scored like prompts: images along a report class's direction rank first
    out = zeroshot_metrics(np.array([[1.0, 0.1], [0.1, 1.0]]), pos[:1], neg[:1], np.array([[1], [0]]), 0.07, ["a"])
    assert out["auc"]["a"] == 1.0
    empty = report_class_embeddings(reports, np.zeros((4, 1)), ["a"])
    assert empty[2] == [] and empty[0].shape == (0, 2)


def test_label_matrix_marks_missing_findings_unknown() -> None:
    records = [Record("1", "a.png", "r", "en", "test", labels={"edema": 1}),
               Record("2", "b.png", "r", "es", "test", labels={"edema": 0, "nodule": 1})]
    y = label_matrix(records, findings=["edema", "nodule"])
    assert y[0, 0] == 1 and np.isnan(y[0, 1])
    assert y[1].tolist() == [0.0, 1.0]


# --- retrieval -------------------------------------------------------------------------

A, B, N = frozenset({"edema"}), frozenset({"nodule"}), frozenset()


def test_recall_at_k_tiny_example_has_known_values() -> None:
    # candidates: c0 = A on axis x, c1 = B on axis y, c2 = normal on axis z
    cand = np.eye(3)
    cand_sets = [A, B, N]
    queries = np.array([
        [1.0, 0.2, 0.0],   # A: nearest c0 (A) -> hit@1
        [0.9, 0.1, 0.3],   # B: order c0, c2, c1 -> miss@1, hit@3
        [0.0, 0.1, 1.0],   # normal: nearest c2 (normal) -> hit@1
        [1.0, 0.0, 0.0],   # {A, B}: no candidate matches -> excluded
    ])
    out = recall_at_k(queries, [A, B, N, A | B], cand, cand_sets, ks=(1, 2, 3))
    assert out["R@1"] == pytest.approx(2 / 3)
    assert out["R@2"] == pytest.approx(2 / 3)
    assert out["R@3"] == 1.0
    assert out["n_queries"] == 3 and out["n_excluded"] == 1
    # each valid query has m = 1 match among M = 3 candidates: chance@k = k / 3
    assert out["chance@1"] == pytest.approx(1 / 3)
    assert out["chance@2"] == pytest.approx(2 / 3)
    assert out["chance@3"] == 1.0


@pytest.mark.parametrize(
    "num_candidates,num_matches,k", [(6, 2, 1), (6, 2, 3), (7, 3, 2), (5, 1, 5), (4, 0, 2)]
)
def test_chance_recall_matches_enumeration_of_all_rankings(
    num_candidates: int, num_matches: int, k: int
) -> None:
    is_match = [i < num_matches for i in range(num_candidates)]
    rankings = list(itertools.permutations(range(num_candidates)))
    hits = sum(any(is_match[c] for c in r[:k]) for r in rankings)
    assert chance_recall(num_candidates, num_matches, k) == pytest.approx(hits / len(rankings))


def test_chance_level_of_random_embeddings_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    sets = [A, B, N, A | B]
    q_sets = [sets[i] for i in rng.integers(0, 4, 40)]
    c_sets = [sets[i] for i in rng.integers(0, 4, 12)]
    trials = [
        recall_at_k(rng.normal(size=(40, 8)), q_sets, rng.normal(size=(12, 8)), c_sets, ks=(2,))
        for _ in range(300)
    ]
    simulated = np.mean([t["R@2"] for t in trials])
    assert simulated == pytest.approx(trials[0]["chance@2"], abs=0.02)


def test_cross_lingual_retrieval_both_directions_and_mean() -> None:
    # EN reports and their ES translations share an embedding axis per finding set
    # EN normal sits next to ES A, ES normal next to EN B: one miss each way
    emb = np.array([[1, 0, 0], [0, 1, 0], [0.8, 0, 0.6],
                    [0.9, 0.1, 0], [0.1, 0.9, 0], [0.2, 0.9, 0.1]])
    langs = ["en", "en", "en", "es", "es", "es"]
    sets = [A, B, N, A, B, N]
    out = cross_lingual_retrieval(torch.tensor(emb), langs, sets, ks=(1, 3))
    assert out["en->es"]["R@1"] == pytest.approx(2 / 3)
    assert out["es->en"]["R@1"] == pytest.approx(2 / 3)
    assert out["mean"]["R@1"] == pytest.approx(2 / 3)
    assert out["mean"]["R@3"] == 1.0
    assert out["mean"]["chance@1"] == pytest.approx(1 / 3)


def test_cross_lingual_retrieval_needs_both_languages() -> None:
    with pytest.raises(ValueError, match="needs reports of both languages"):
        cross_lingual_retrieval(np.eye(2), ["en", "en"], [A, B])


# --- community bias --------------------------------------------------------------------


def _two_languages(
    offset: float, n: int = 100, d: int = 16, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    base = np.zeros(d)
    base[0] = 10.0  # keep points away from the origin so L2 normalisation stays tame
    shift = np.zeros(d)
    shift[1] = offset
    en = base + rng.normal(size=(n, d))
    es = base + shift + rng.normal(size=(n, d))
    return np.vstack([en, es]), ["en"] * n + ["es"] * n


def test_community_bias_well_separated_languages_score_high() -> None:
    emb, langs = _two_languages(offset=8.0)
    out = community_bias(emb, langs)
    assert out["lang_mean_dist_over_spread"] > 1.5
    assert out["silhouette_lang"] > 0.5
    assert out["lang_id_probe_acc"] > 0.98
    assert out["lang_id_chance"] == 0.5
    assert out["n_per_lang"] == {"en": 100, "es": 100}


def test_community_bias_identical_distributions_score_low() -> None:
    emb, langs = _two_languages(offset=0.0, n=300)
    out = community_bias(emb, langs)
    assert out["lang_mean_dist_over_spread"] < 0.2  # about sqrt(2 / 300) = 0.08
    assert abs(out["silhouette_lang"]) < 0.05
    assert abs(out["lang_id_probe_acc"] - 0.5) < 0.1


def test_mean_distance_over_spread_hand_value_and_three_languages() -> None:
    # two languages, each two points at +-1 around its mean (spread 1); means 4 apart
    emb = np.array([[0, 1.0], [0, -1.0], [4, 1.0], [4, -1.0]])
    langs = ["en", "en", "es", "es"]
    # normalisation changes the geometry, so check against the same computation by hand
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    m_en, m_es = unit[:2].mean(0), unit[2:].mean(0)
    s_en = np.sqrt(np.mean(np.sum((unit[:2] - m_en) ** 2, axis=1)))
    s_es = np.sqrt(np.mean(np.sum((unit[2:] - m_es) ** 2, axis=1)))
    expected = np.linalg.norm(m_en - m_es) / ((s_en + s_es) / 2)
    assert mean_distance_over_spread(emb, langs) == pytest.approx(expected)
    rng = np.random.default_rng(1)
    centres = np.eye(3) * 5
    emb3 = np.vstack([c + 0.3 * rng.normal(size=(20, 3)) for c in centres])
    out = community_bias(emb3, ["en"] * 20 + ["es"] * 20 + ["fr"] * 20)
    assert out["lang_id_probe_acc"] == 1.0
    assert out["silhouette_lang"] > 0.8
    assert out["lang_id_chance"] == pytest.approx(1 / 3)


def test_community_bias_refuses_a_single_language() -> None:
    with pytest.raises(ValueError, match="at least two languages"):
        community_bias(np.ones((4, 2)), ["en"] * 4)


# --- linear probe ----------------------------------------------------------------------


def test_stratified_subsample_keeps_the_minimum_per_class() -> None:
    labels = np.array([1] * 3 + [0] * 97)
    idx, raised = stratified_subsample(labels, 0.01, np.random.default_rng(0), min_per_class=2)
    assert raised
    assert np.sum(labels[idx] == 1) == 2 and np.sum(labels[idx] == 0) == 2
    idx, raised = stratified_subsample(labels, 1.0, np.random.default_rng(0))
    assert not raised and idx.size == 100


def test_linear_probe_returns_every_fraction_and_seed() -> None:
    rng = np.random.default_rng(0)
    findings = ["a", "b", "c"]

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, size=(n, 3)).astype(float)
        x = np.hstack([y * 2.0 + 0.5 * rng.normal(size=(n, 3)), rng.normal(size=(n, 5))])
        y[:, 2] = 0  # finding "c" has negatives only: skipped
        y[0, 0] = np.nan  # unknown label, ignored
        return x, y

    x_tr, y_tr = make(200)
    x_te, y_te = make(100)
    out = linear_probe(x_tr, y_tr, x_te, y_te, fractions=(0.01, 0.1, 1.0), seeds=(0, 1),
                       findings=findings)
    assert list(out) == [0.01, 0.1, 1.0]
    for fraction, res in out.items():
        assert len(res["per_seed"]) == 2
        assert set(res["per_finding"]) == {"a", "b"}
        assert res["mean"] == pytest.approx(np.mean(res["per_seed"]))
        assert any("c: skipped" in n for n in res["notes"])
    assert out[1.0]["mean"] > 0.95
    assert out[1.0]["n_train"]["a"] == 199
    assert out[0.01]["n_train"]["a"] == 4  # 2 per class, the minimum
    assert any("a: 2 per class enforced" in n for n in out[0.01]["notes"])
    again = linear_probe(x_tr, y_tr, x_te, y_te, fractions=(0.1,), seeds=(0, 1), findings=findings)
    assert again[0.1]["per_seed"] == out[0.1]["per_seed"]  # seeded
