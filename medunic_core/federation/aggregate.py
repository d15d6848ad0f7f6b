"""Aggregation math on named arrays (``{name: ndarray}``), used by the coordinator's strategy.

Flower's strategies compute the weighted average (and FedAdam's server step); what Med-UniC
adds is here, apart from Flower so that it is unit-tested on plain arrays:

- :func:`update_norms` and :func:`outliers`: an update whose norm is not finite or exceeds
  ``factor`` x the median of the other sites' norms is rejected, never averaged;
- :func:`fill_unused_rows`: rows of the token-embedding matrix averaged only over the
  sites that used them (an English site must not dilute Spanish rows);
- :func:`running_statistics`: the weighted mean of the BatchNorm running statistics, which a
  server optimizer must not step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medunic_core.exchange import BN_BUFFERS


def update_norms(arrays: Sequence[Mapping[str, np.ndarray]], current: Mapping[str, np.ndarray]) -> list[float]:
    """L2 norm of each site's update (received - current), over all travelling arrays."""
    norms = []
    for a in arrays:
        total = 0.0
        for k, v in a.items():
            d = v.astype(np.float64) - current[k].astype(np.float64)
            total += float(np.sum(d * d))
        norms.append(float(np.sqrt(total)))
    return norms


def outliers(norms: Sequence[float], factor: float) -> list[int]:
    """Indices whose norm is not finite or exceeds ``factor`` x the median of the others."""
    bad = [i for i, n in enumerate(norms) if not np.isfinite(n)]
    finite = [i for i in range(len(norms)) if i not in bad]
    for i in finite:
        others = [norms[j] for j in finite if j != i]
        if others and norms[i] > factor * max(float(np.median(others)), 1e-12):
            bad.append(i)
    return sorted(bad)


def fill_unused_rows(
    arrays: Sequence[Mapping[str, np.ndarray]], usage: Sequence[np.ndarray], weights: Sequence[float], key: str,
) -> list[dict[str, np.ndarray]]:
    """Copies of the sites' arrays in which each site's token-embedding rows it did not use
    are replaced, so that a plain weighted average gives, row by row, the average over the
    sites that used the row.

    A site's unused row is set to the users' weighted mean m; the overall weighted mean is
    then m exactly. Rows nobody used are left as the sites sent them (plain FedAvg): each
    site's optimizer moved them alike (weight decay, momentum), as centralized training would.
    """
    used = np.stack([u.astype(bool) for u in usage])  # sites x rows
    w = np.asarray(weights, dtype=np.float64)[:, None]
    stacked = np.stack([a[key].astype(np.float64) for a in arrays])  # sites x rows x d
    wu = used * w
    denom = wu.sum(0)
    mean = np.einsum("sr,srd->rd", wu, stacked) / np.maximum(denom, 1e-12)[:, None]
    out = []
    for i, a in enumerate(arrays):
        patched = a[key].astype(np.float64)
        replace = ~used[i] & (denom > 0)
        patched[replace] = mean[replace]
        out.append({**a, key: patched.astype(a[key].dtype)})
    return out


def running_statistics(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """The weighted mean (float64) of every BatchNorm running mean and variance the sites sent."""
    keys = [k for k in arrays[0] if k.rsplit(".", 1)[-1] in BN_BUFFERS]
    total = float(sum(weights))
    return {k: sum(w * a[k].astype(np.float64) for a, w in zip(arrays, weights)) / total for k in keys}
