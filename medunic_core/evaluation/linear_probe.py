"""Linear probing of frozen image features at fractions of the training labels.

Follows the 1/10/100% protocol of MEDUNIC.md with one binary classifier per finding:
standardised features and a logistic regression with ``class_weight="balanced"`` by
default, because at 1% of the labels rare findings have a handful of positives and an
unweighted fit collapses towards "absent". The score is macro AUC on the test features
(the mean of per-finding AUCs over findings with both classes in the test labels).

Subsampling is per finding and stratified: each class keeps ``round(fraction * count)``
of its known training labels, but at least ``min_per_class`` (or all it has), so that
every fit sees both classes. Where that minimum overrides the fraction, a note says so.

Under ``dp.sgd`` (:func:`dp_linear_probe`) the probe is one multi-label logistic layer
trained with DP-SGD (Opacus) on L2-normalised features (standardising would use the
data's statistics outside the guarantee), on ``fraction`` of the images; the result
carries the epsilon of each fit and of all fits together (they use overlapping data).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import torch
from torch import nn

from medunic_core.config import DpSgdConfig
from medunic_core.constants import FINDINGS
from medunic_core.evaluation.zeroshot import as_array, known_mask, l2_normalize
from medunic_core.privacy import make_private, rdp_epsilon


def stratified_subsample(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, min_per_class: int = 2
) -> tuple[np.ndarray, bool]:
    """Indices into ``labels`` (0/1 vector) keeping ``fraction`` of each class.

    Each class keeps ``max(min_per_class, round(fraction * n_class))`` capped at its size.
    Returns the sorted indices and whether the minimum raised a class above its fraction.
    """
    chosen, raised = [], False
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        wanted = int(round(fraction * idx.size))
        take = min(max(wanted, min_per_class), idx.size)
        raised |= take > wanted
        chosen.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(chosen)), raised


def _fit_auc(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    class_weight: Optional[str], seed: int,
) -> float:
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=2000, class_weight=class_weight, random_state=seed),
    )
    probe.fit(x_train, y_train)
    return float(roc_auc_score(y_test, probe.predict_proba(x_test)[:, 1]))


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    findings: Sequence[str] = FINDINGS,
    class_weight: Optional[str] = "balanced",
    min_per_class: int = 2,
) -> dict[float, dict[str, Any]]:
    """Macro test AUC of per-finding linear probes for each label fraction and seed.

    Features are N x d, labels N x K (1/0, -1 or NaN unknown). A finding without both
    classes in its known training or test labels is skipped and named in ``notes``.
    Returns ``{fraction: {"mean", "std" (population, over seeds), "per_seed": [...],
    "per_finding": {finding: mean AUC over seeds}, "n_train": {finding: size},
    "notes": [...]}}``; the rates are None when no finding could be scored.
    """
    x_tr, y_tr, x_te, y_te = (as_array(a) for a in (train_features, train_labels,
                                                     test_features, test_labels))
    findings = list(findings)
    if y_tr.shape != (x_tr.shape[0], len(findings)) or y_te.shape != (x_te.shape[0], len(findings)):
        raise ValueError(
            f"labels {y_tr.shape} / {y_te.shape} must be N x {len(findings)} like the features "
            f"{x_tr.shape} / {x_te.shape}"
        )
    known_tr, known_te = known_mask(y_tr), known_mask(y_te)
    usable, base_notes = [], []
    for k, finding in enumerate(findings):
        classes_tr = np.unique(y_tr[known_tr[:, k], k]).size
        classes_te = np.unique(y_te[known_te[:, k], k]).size
        if classes_tr < 2 or classes_te < 2:
            base_notes.append(f"{finding}: skipped, one class only in the train or test labels")
        else:
            usable.append(k)
    results: dict[float, dict[str, Any]] = {}
    for fraction in fractions:
        notes, n_train = list(base_notes), {}
        per_seed, per_finding = [], {findings[k]: [] for k in usable}
        for seed in seeds:
            aucs = []
            for k in usable:
                rows = np.flatnonzero(known_tr[:, k])
                # one stream per (seed, finding): a finding's sample does not depend on the others
                rng = np.random.default_rng((seed, k))
                picked, raised = stratified_subsample(y_tr[rows, k], fraction, rng, min_per_class)
                if raised and findings[k] not in n_train:
                    notes.append(
                        f"{findings[k]}: {min_per_class} per class enforced at fraction {fraction}"
                    )
                n_train[findings[k]] = int(picked.size)
                test_rows = known_te[:, k]
                auc = _fit_auc(x_tr[rows[picked]], y_tr[rows[picked], k].astype(int),
                               x_te[test_rows], y_te[test_rows, k].astype(int), class_weight, seed)
                aucs.append(auc)
                per_finding[findings[k]].append(auc)
            if aucs:
                per_seed.append(float(np.mean(aucs)))
        results[fraction] = {
            "mean": float(np.mean(per_seed)) if per_seed else None,
            "std": float(np.std(per_seed)) if per_seed else None,
            "per_seed": per_seed,
            "per_finding": {f: float(np.mean(v)) for f, v in per_finding.items()},
            "n_train": n_train,
            "notes": notes,
        }
    return results


def macro_auc(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str] = FINDINGS
              ) -> tuple[Optional[float], dict[str, float]]:
    """Mean test AUC of N x K ``scores`` over the findings with both classes among their
    known ``labels`` (None when there is none), and the AUC of each of those findings."""
    known = known_mask(labels)
    usable = [k for k in range(len(findings)) if np.unique(labels[known[:, k], k]).size == 2]
    return _macro_auc(scores, labels, known, usable, list(findings)) if usable else (None, {})


def _macro_auc(scores: np.ndarray, labels: np.ndarray, known: np.ndarray, usable: list[int],
               findings: list[str]) -> tuple[float, dict[str, float]]:
    aucs = {findings[k]: float(roc_auc_score(labels[known[:, k], k].astype(int), scores[known[:, k], k]))
            for k in usable}
    return float(np.mean(list(aucs.values()))), aucs


def dp_linear_probe(
    train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, dp: DpSgdConfig,
    fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0, 1, 2),
    findings: Sequence[str] = FINDINGS, batch_size: int = 64,
) -> dict[float, dict[str, Any]]:
    """:func:`linear_probe`'s protocol with DP-SGD; the same result keys plus ``privacy``."""
    x_tr, y_tr, x_te, y_te = (as_array(a) for a in (train_features, train_labels, test_features, test_labels))
    x_tr, x_te, findings = l2_normalize(x_tr), l2_normalize(x_te), list(findings)
    known_tr, known_te = known_mask(y_tr), known_mask(y_te)
    usable = [k for k in range(len(findings)) if np.unique(y_te[known_te[:, k], k]).size == 2]
    results: dict[float, dict[str, Any]] = {}
    fits = []
    for fraction in fractions:
        per_seed, per_finding, epsilons = [], {findings[k]: [] for k in usable}, []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(len(x_tr), size=max(1, int(round(fraction * len(x_tr)))), replace=False))
            torch.manual_seed(seed)
            model = nn.Linear(x_tr.shape[1], len(findings))
            data = torch.utils.data.TensorDataset(
                torch.tensor(x_tr[rows], dtype=torch.float32), torch.tensor(np.nan_to_num(y_tr[rows]).clip(0, 1),
                                                                            dtype=torch.float32),
                torch.tensor(known_tr[rows], dtype=torch.float32))
            loader = torch.utils.data.DataLoader(data, batch_size=min(batch_size, len(rows)))
            private = make_private(model, torch.optim.SGD(model.parameters(), lr=dp.probe_lr), loader, dp,
                                   dp.probe_epochs * len(loader))
            for _ in range(dp.probe_epochs):
                for x, y, known in private.loader:  # Poisson batches, possibly empty
                    loss = (nn.functional.binary_cross_entropy_with_logits(private.model(x), y, reduction="none")
                            * known).sum(1).mean() if len(x) else private.model(x).sum()
                    loss.backward()
                    private.optimizer.step()
                    private.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                scores = model(torch.tensor(x_te, dtype=torch.float32)).numpy()
            mean, aucs = _macro_auc(scores, y_te, known_te, usable, findings)
            per_seed.append(mean)
            for f, a in aucs.items():
                per_finding[f].append(a)
            epsilons.append(private.epsilon())
            fits.append((private.noise_multiplier, private.sample_rate, dp.probe_epochs * len(loader)))
        results[fraction] = {
            "mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed,
            "per_finding": {f: float(np.mean(v)) for f, v in per_finding.items()},
            "n_train": {"images": len(rows)},
            "notes": [f"DP-SGD: epsilon {max(epsilons):.3f} per fit at delta {dp.delta:g}"],
            "privacy": {"epsilon_per_fit": max(epsilons), "delta": float(dp.delta)},
        }
    total = rdp_epsilon(fits, float(dp.delta))  # every fit saw (part of) the same images
    for r in results.values():
        r["privacy"]["epsilon_all_fits"] = total
        r["notes"].append(f"DP-SGD: epsilon {total:.3f} over all {len(fits)} fits together")
    return results
