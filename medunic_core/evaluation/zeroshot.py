"""Zero-shot classification from image and prompt embeddings (MEDUNIC.md, "Evaluation").

For finding k, an image's probability of "present" is the softmax over its cosine
similarities to the positive and the negative prompt embedding, divided by the
temperature: p = exp(s_pos/T) / (exp(s_pos/T) + exp(s_neg/T)). The decision is
``p > 0.5`` (present). The public Med-UniC code inverted that decision, which leaves AUC
unchanged but turns accuracy and F1 upside down; tests pin the orientation.

The array helpers here (``as_array``, ``l2_normalize``, ``label_matrix``) are shared by the
other metric modules of this package.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from medunic_core.constants import FINDINGS
from medunic_core.data.manifest import Record


def as_array(x: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array, list or torch tensor (any device)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, so that dot products are cosine similarities."""
    x = as_array(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def label_matrix(records: Sequence[Record], findings: Sequence[str] = FINDINGS) -> np.ndarray:
    """N x K float array of 1 (present), 0 (absent) and NaN (finding not in the record)."""
    return np.array(
        [[float(r.labels[f]) if f in r.labels else np.nan for f in findings] for r in records],
        dtype=np.float64,
    ).reshape(len(records), len(findings))


def known_mask(labels: np.ndarray) -> np.ndarray:
    """True where a label is 0 or 1; NaN and -1 both mean unknown."""
    return np.isfinite(labels) & (labels >= 0)


def class_embedding(prompt_embeddings: Any) -> np.ndarray:
    """One d-vector from P x d prompt embeddings: normalise, average, re-normalise (CLIP)."""
    emb = l2_normalize(np.atleast_2d(as_array(prompt_embeddings)))
    return l2_normalize(emb.mean(axis=0))


def report_class_embeddings(
    report_emb: Any, labels: Any, findings: Sequence[str] = FINDINGS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class embeddings from labelled reports instead of prompts: for each finding, the
    :func:`class_embedding` of the reports that state it (positive) and of those that do not
    (negative). Scored like prompts, they show how much of zero-shot the prompts lose against
    the reports the model was trained on (README, "Status").

    Returns K' x d positive and negative embeddings and the K' findings that have reports of
    both classes (the others have no direction to score along).
    """
    emb, y = as_array(report_emb), as_array(labels)
    pos, neg, kept = [], [], []
    for k, finding in enumerate(findings):
        present, absent = y[:, k] == 1, y[:, k] == 0
        if present.any() and absent.any():
            pos.append(class_embedding(emb[present]))
            neg.append(class_embedding(emb[absent]))
            kept.append(finding)
    if not kept:
        return np.zeros((0, emb.shape[1])), np.zeros((0, emb.shape[1])), kept
    return np.stack(pos), np.stack(neg), kept


def zeroshot_probs(image_emb: Any, pos_emb: Any, neg_emb: Any, temperature: float) -> np.ndarray:
    """N x K probability of "present": softmax over (pos, neg) cosine similarity / T.

    ``image_emb`` is N x d, ``pos_emb`` and ``neg_emb`` are K x d (one class embedding per
    finding, see :func:`class_embedding`); all are L2-normalised here.
    """
    img = l2_normalize(image_emb)
    s_pos = img @ l2_normalize(pos_emb).T
    s_neg = img @ l2_normalize(neg_emb).T
    # softmax over two logits is the logistic function of their difference
    return 1.0 / (1.0 + np.exp(-(s_pos - s_neg) / temperature))


def _mean(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def zeroshot_metrics(
    image_emb: Any,
    pos_emb: Any,
    neg_emb: Any,
    labels: Any,
    temperature: float,
    findings: Sequence[str] = FINDINGS,
) -> dict[str, Any]:
    """Per-finding AUC, F1 and accuracy of zero-shot predictions, and their macro means.

    ``labels`` is N x K with 1/0 and -1 or NaN for unknown (ignored). A finding whose known
    labels hold one class only has no AUC: it is reported as None in ``auc``, listed in
    ``skipped`` and left out of all three macro means, so that they average the same
    findings. ``accuracy`` is that macro mean of per-finding accuracies.

    Returns ``{"auc", "f1", "acc", "n"}`` (dicts by finding) plus ``"macro_auc"``,
    ``"macro_f1"``, ``"accuracy"`` (None when no finding could be scored) and ``"skipped"``.
    """
    findings = list(findings)
    y = as_array(labels)
    probs = zeroshot_probs(image_emb, pos_emb, neg_emb, temperature)
    if y.shape != probs.shape or probs.shape[1] != len(findings):
        raise ValueError(
            f"labels {y.shape}, predictions {probs.shape} and {len(findings)} findings disagree"
        )
    known = known_mask(y)
    out: dict[str, Any] = {"auc": {}, "f1": {}, "acc": {}, "n": {}, "skipped": []}
    for k, finding in enumerate(findings):
        yk, pk = y[known[:, k], k].astype(int), probs[known[:, k], k]
        out["n"][finding] = int(yk.size)
        if np.unique(yk).size < 2:
            out["auc"][finding] = out["f1"][finding] = out["acc"][finding] = None
            out["skipped"].append(finding)
            continue
        pred = (pk > 0.5).astype(int)
        out["auc"][finding] = float(roc_auc_score(yk, pk))
        out["f1"][finding] = float(f1_score(yk, pred, zero_division=0))
        out["acc"][finding] = float(np.mean(pred == yk))
    scored = [f for f in findings if f not in out["skipped"]]
    out["macro_auc"] = _mean([out["auc"][f] for f in scored])
    out["macro_f1"] = _mean([out["f1"][f] for f in scored])
    out["accuracy"] = _mean([out["acc"][f] for f in scored])
    return out
