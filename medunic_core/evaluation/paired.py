"""Paired comparisons over seeds: does variant A beat variant B, or is it not resolved?

Two variants trained with the same seeds share their data order, initialisation and
augmentation draws, so the per-seed difference A - B cancels most of the run-to-run
spread. The verdict comes from the 95% t-interval of the mean difference: "better" when
the whole interval favours A, "worse" when it favours B, "not resolved" when it holds 0
(then the experiment is too small to rank the two, whatever the means say).

A comparison may also carry a margin per metric, the largest difference it tolerates (issue
12's parity: zero-shot within 0.03, R@1 within 0.05). Then the same interval decides
whether A is within the margin of B (:func:`margin_verdict`): ``equivalent`` when the whole
interval lies within +-margin, ``non-inferior`` when A's worse end is no further than the
margin, ``inferior`` when all of it is, ``not resolved`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

LOWER_IS_BETTER = ("loss", "bias/text/lang_mean_dist_over_spread", "bias/text/silhouette_lang",
                   "bias/text/lang_id_probe_acc", "seconds")


def higher_is_better(metric: str) -> bool:
    """Losses, language separation of the reports and time are better low; rates high."""
    return not any(part in metric for part in LOWER_IS_BETTER)


def paired_difference(a: Sequence[float], b: Sequence[float], higher: bool = True,
                      level: float = 0.95) -> dict[str, Any]:
    """Mean of the per-seed differences ``a - b``, its t-interval and a verdict for A."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds: {len(a)} vs {len(b)} values")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not len(d):
        raise ValueError("paired comparison needs at least one seed")
    n, mean = len(d), float(d.mean())
    if n < 2:  # no interval from one seed (None: JSON has no NaN)
        return {"n": n, "mean": mean, "ci": [None, None], "verdict": "not resolved", "differences": d.tolist()}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    favours_a = lo > 0 if higher else hi < 0
    favours_b = hi < 0 if higher else lo > 0
    verdict = "better" if favours_a else "worse" if favours_b else "not resolved"
    return {"n": n, "mean": mean, "ci": [lo, hi], "verdict": verdict, "differences": d.tolist()}


def margin_verdict(ci: Sequence[Optional[float]], margin: float, higher: bool = True) -> str:
    """Whether A lies within ``margin`` of B, from the interval of A - B (see the module)."""
    lo, hi = ci
    if lo is None or hi is None:
        return "not resolved"
    worst, best = (lo, hi) if higher else (-hi, -lo)  # A's worse and better ends, as gains
    if worst >= -margin:
        return "equivalent" if best <= margin else "non-inferior"
    return "inferior" if best < -margin else "not resolved"


@dataclass
class Comparison:
    """Row A against row B on ``metrics`` (default: the suite's). Several rows in ``a`` mean
    "the best of these" by the mean of the first metric; ``b`` then lists each one's
    counterpart (same length) or one row for all. ``margins``: metric -> the largest
    difference tolerated (:func:`margin_verdict`)."""

    name: str = ""
    a: list[str] = field(default_factory=list)
    b: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    margins: dict[str, float] = field(default_factory=dict)


def _pick(comparison: Comparison, runs: Mapping[str, Mapping[str, Any]], metric: str) -> tuple[str, str]:
    candidates, partners = list(comparison.a), list(comparison.b)
    if len(partners) == 1:
        partners *= len(candidates)
    if not candidates or len(partners) != len(candidates):
        raise ValueError(f"comparison '{comparison.name}': a needs rows and b one row or one per row of a")
    missing = [r for r in (*candidates, *partners) if r not in runs]
    if missing:
        raise ValueError(f"comparison '{comparison.name}': no rows {missing}; rows are {sorted(runs)}")
    sign = 1.0 if higher_is_better(metric) else -1.0
    best = max(range(len(candidates)), key=lambda i: sign * float(runs[candidates[i]][metric]["mean"]))
    return candidates[best], partners[best]


def paired_comparisons(runs: Mapping[str, Mapping[str, Any]], comparisons: Sequence[Comparison],
                       metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Each comparison on each metric, from ``compare.json``'s ``runs`` (values in seed order)."""
    out = []
    for comparison in comparisons:
        keys = list(comparison.metrics or metrics)
        rows = [r for r in (*comparison.a, *comparison.b) if r in runs]
        absent = [m for m in comparison.metrics if any(m not in runs[r] for r in rows)]
        if absent:  # named by the comparison itself: a misspelt name, or an evaluation that did not run
            raise ValueError(f"comparison '{comparison.name}': its metrics {absent} are not in every row it compares")
        a, b = _pick(comparison, runs, keys[0])
        for metric in keys:
            if metric not in runs[a] or metric not in runs[b]:
                continue
            higher = higher_is_better(metric)
            result = paired_difference(runs[a][metric]["values"], runs[b][metric]["values"], higher)
            if metric in comparison.margins:
                margin = float(comparison.margins[metric])
                result.update(margin=margin, within_margin=margin_verdict(result["ci"], margin, higher))
            out.append({"comparison": comparison.name, "a": a, "b": b, "metric": metric, **result})
    return out


def paired_table(rows: Sequence[Mapping[str, Any]], title: Optional[str] = None) -> str:
    """Markdown: one line per comparison and metric, mean difference A - B with its interval."""
    margins = any("margin" in r for r in rows)
    lines = [f"## {title}\n" if title else "",
             "| comparison | A | B | metric | seeds | mean A - B | 95% interval | verdict for A |"
             + (" within margin |" if margins else ""),
             "|---|---|---|---|---:|---:|---|---|" + ("---|" if margins else "")]
    for r in rows:
        lo, hi = r["ci"]
        interval = "n/a" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
        within = (f" {r['within_margin']} (+-{r['margin']:g}) |" if "margin" in r else " |") if margins else ""
        lines.append(f"| {r['comparison']} | {r['a']} | {r['b']} | {r['metric']} | {r['n']} | {r['mean']:+.3f} | "
                     f"{interval} | {r['verdict']} |{within}")
    return "\n".join(line for line in lines if line)
