"""Cross-lingual report retrieval, the primary metric that separates variants (DESIGN.md).

Each report of one language queries all reports of the other language, ranked by cosine
similarity. A query scores a hit at k when any of its top-k candidates has exactly the
same set of positive findings (two normal reports, with empty sets, match). R@k is the
share of hits over the queries that have at least one matching candidate; queries with
none cannot be hit by any ranking and are excluded and counted.

The chance level of a query with m matching candidates among M is the exact expected
R@k of a uniformly random ranking: 1 - C(M-m, k) / C(M, k) (hypergeometric: the
probability that k candidates drawn without replacement include no match), averaged
over the same queries as R@k.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from medunic_core.evaluation.zeroshot import l2_normalize

QUERY_CHUNK = 1024  # queries ranked at once; bounds memory at QUERY_CHUNK x M similarities


def chance_recall(num_candidates: int, num_matches: int, k: int) -> float:
    """Expected R@k of a random ranking: 1 - C(M-m, k) / C(M, k), computed as a product."""
    miss = 1.0
    for i in range(min(k, num_candidates)):
        miss *= max(num_candidates - num_matches - i, 0) / (num_candidates - i)
    return 1.0 - miss


def recall_at_k(
    queries: Any,
    query_sets: Sequence[Hashable],
    candidates: Any,
    candidate_sets: Sequence[Hashable],
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """R@k and its chance level for Q x d queries against M x d candidates (cosine).

    ``query_sets`` and ``candidate_sets`` hold each item's ground truth (a frozenset of
    positive findings); equality decides a match. Ties in similarity keep candidate order.
    Returns ``{"R@k": .., "chance@k": .. for each k, "n_queries", "n_excluded"}``; the
    rates are None when no query has a match.
    """
    q, c = l2_normalize(queries), l2_normalize(candidates)
    if len(query_sets) != q.shape[0] or len(candidate_sets) != c.shape[0]:
        raise ValueError(
            f"{q.shape[0]} queries / {len(query_sets)} query sets and "
            f"{c.shape[0]} candidates / {len(candidate_sets)} candidate sets disagree"
        )
    ids: dict[Hashable, int] = {}
    q_ids = np.array([ids.setdefault(s, len(ids)) for s in query_sets], dtype=np.int64)
    c_ids = np.array([ids.setdefault(s, len(ids)) for s in candidate_sets], dtype=np.int64)
    num_matches = np.bincount(c_ids, minlength=len(ids))[q_ids]
    valid = num_matches > 0
    top = min(max(ks), c.shape[0])
    hits = {k: 0 for k in ks}
    for start in range(0, q.shape[0], QUERY_CHUNK):
        rows = np.arange(start, min(start + QUERY_CHUNK, q.shape[0]))
        rows = rows[valid[rows]]
        if rows.size == 0:
            continue
        order = np.argsort(-(q[rows] @ c.T), axis=1, kind="stable")[:, :top]
        ranked_match = c_ids[order] == q_ids[rows, None]
        for k in ks:
            hits[k] += int(ranked_match[:, :k].any(axis=1).sum())
    n = int(valid.sum())
    out: dict[str, Any] = {}
    for k in ks:
        chance = [chance_recall(c.shape[0], int(m), k) for m in num_matches[valid]]
        out[f"R@{k}"] = hits[k] / n if n else None
        out[f"chance@{k}"] = float(np.mean(chance)) if n else None
    out["n_queries"] = n
    out["n_excluded"] = int((~valid).sum())
    return out


def cross_lingual_retrieval(
    embeddings: Any,
    langs: Sequence[str],
    finding_sets: Sequence[frozenset[str]],
    ks: Sequence[int] = (1, 5),
    pair: tuple[str, str] = ("en", "es"),
) -> dict[str, Any]:
    """Retrieval both ways between the two languages of ``pair`` in one pool of N reports.

    ``embeddings`` is N x d text embeddings, ``langs`` and ``finding_sets`` (e.g.
    ``Record.finding_set``) describe each row. Returns ``{"en->es": {...}, "es->en": {...},
    "mean": {"R@k", "chance@k"}}`` with the per-direction dicts of :func:`recall_at_k`;
    ``mean`` averages the two directions (None if either is undefined).
    """
    emb = l2_normalize(embeddings)
    langs_arr = np.asarray(langs)
    if len(langs_arr) != emb.shape[0] or len(finding_sets) != emb.shape[0]:
        raise ValueError(
            f"{emb.shape[0]} embeddings, {len(langs_arr)} languages and "
            f"{len(finding_sets)} finding sets disagree"
        )
    out: dict[str, Any] = {}
    for src, dst in (pair, pair[::-1]):
        qi, ci = np.flatnonzero(langs_arr == src), np.flatnonzero(langs_arr == dst)
        if qi.size == 0 or ci.size == 0:
            raise ValueError(f"retrieval {src}->{dst} needs reports of both languages; "
                             f"found {qi.size} '{src}' and {ci.size} '{dst}'")
        out[f"{src}->{dst}"] = recall_at_k(
            emb[qi], [finding_sets[i] for i in qi], emb[ci], [finding_sets[i] for i in ci], ks
        )
    directions = [out[f"{a}->{b}"] for a, b in (pair, pair[::-1])]
    out["mean"] = {}
    for k in ks:
        for key in (f"R@{k}", f"chance@{k}"):
            values = [d[key] for d in directions]
            out["mean"][key] = None if None in values else float(np.mean(values))
    return out
