"""Community-bias metrics: how much text embeddings are organised by language (DESIGN.md).

All three work on L2-normalised embeddings (the cosine geometry that retrieval and the
contrastive losses use) and on any number of languages >= 2:

- ``lang_mean_dist_over_spread``: mean pairwise Euclidean distance between the language
  means divided by the mean within-language spread, where the spread of a language is
  the RMS distance of its points to its own mean (the square root of the trace of its
  covariance). Unweighted means over languages and pairs, so a large community does not
  dominate. About sqrt(2/n) for identical distributions of n points per language; above
  1 means the languages sit further apart than their points scatter.
- ``silhouette_lang``: silhouette score with languages as clusters, cosine metric
  (sklearn); 1 = separate language clusters, about 0 = mixed.
- ``lang_id_probe_acc``: accuracy of a linear language classifier (standardised features,
  logistic regression), mean over stratified k-fold cross-validation with a fixed seed;
  ``lang_id_chance`` is the majority-language share it must beat.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medunic_core.evaluation.zeroshot import l2_normalize

SILHOUETTE_MAX_POINTS = 5000  # silhouette is O(N^2); larger sets are subsampled (seeded)


def _groups(embeddings: Any, langs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    emb, lang_arr = l2_normalize(embeddings), np.asarray(langs)
    if emb.ndim != 2 or lang_arr.shape != (emb.shape[0],):
        raise ValueError(f"embeddings {emb.shape} need one language each, got {lang_arr.shape}")
    names = sorted(set(lang_arr.tolist()))
    if len(names) < 2:
        raise ValueError(f"community bias needs at least two languages, got {names}")
    return emb, lang_arr, names


def mean_distance_over_spread(embeddings: Any, langs: Sequence[str]) -> float:
    """Mean distance between language means / mean RMS within-language spread."""
    emb, lang_arr, names = _groups(embeddings, langs)
    means, spreads = [], []
    for name in names:
        points = emb[lang_arr == name]
        mean = points.mean(axis=0)
        means.append(mean)
        spreads.append(np.sqrt(np.mean(np.sum((points - mean) ** 2, axis=1))))
    between = np.mean([np.linalg.norm(a - b) for a, b in combinations(means, 2)])
    return float(between / max(np.mean(spreads), 1e-12))


def language_silhouette(embeddings: Any, langs: Sequence[str], seed: int = 0) -> float:
    """Silhouette score of the language partition (cosine), seeded subsample if large."""
    emb, lang_arr, _ = _groups(embeddings, langs)
    sample = SILHOUETTE_MAX_POINTS if emb.shape[0] > SILHOUETTE_MAX_POINTS else None
    return float(
        silhouette_score(emb, lang_arr, metric="cosine", sample_size=sample, random_state=seed)
    )


def language_id_probe(
    embeddings: Any, langs: Sequence[str], folds: int = 5, seed: int = 0
) -> float:
    """Mean stratified k-fold accuracy of a logistic-regression language classifier.

    ``folds`` is lowered to the size of the smallest language when that is smaller (at
    least 2 reports per language are needed).
    """
    emb, lang_arr, names = _groups(embeddings, langs)
    smallest = min(int(np.sum(lang_arr == n)) for n in names)
    if smallest < 2:
        raise ValueError(
            f"language-ID probe needs >= 2 reports per language; smallest has {smallest}"
        )
    cv = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(np.mean(cross_val_score(probe, emb, lang_arr, cv=cv, scoring="accuracy")))


def community_bias(
    embeddings: Any, langs: Sequence[str], folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """All community-bias metrics of N x d embeddings with one language label per row.

    Returns ``{"lang_mean_dist_over_spread", "silhouette_lang", "lang_id_probe_acc",
    "lang_id_chance", "n_per_lang": {lang: count}}``.
    """
    _, lang_arr, names = _groups(embeddings, langs)
    counts = {n: int(np.sum(lang_arr == n)) for n in names}
    return {
        "lang_mean_dist_over_spread": mean_distance_over_spread(embeddings, langs),
        "silhouette_lang": language_silhouette(embeddings, langs, seed),
        "lang_id_probe_acc": language_id_probe(embeddings, langs, folds, seed),
        "lang_id_chance": max(counts.values()) / len(lang_arr),
        "n_per_lang": counts,
    }
