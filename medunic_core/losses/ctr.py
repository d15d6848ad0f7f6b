"""Cross-lingual Text alignment Regulariser (MEDUNIC.md, L_CTR = L_TF + L_TT)."""

from __future__ import annotations

import torch


def _redundancy(m: torch.Tensor, lam: float) -> torch.Tensor:
    """sum_i (1 - M_ii)^2 + lam * sum_{i != j} M_ij^2 for a square matrix M."""
    diag = torch.diagonal(m)
    on = (1.0 - diag).pow(2).sum()
    off = m.pow(2).sum() - diag.pow(2).sum()
    return on + lam * off


def tf_loss(z_a: torch.Tensor, z_b: torch.Tensor, lam: float, denom: float) -> torch.Tensor:
    """Text-feature alignment: C = Z_A^T Z_B / N (D x D); returns raw(C) / (denom * D).

    z_a, z_b: (N, D), each already standardised per dimension over the batch (the
    affine-free BatchNorm of P_d). Paper: lam = 0.0051, denom = 2.
    """
    return tf_loss_from_c(z_a.t() @ z_b / z_a.shape[0], lam, denom)


def tf_loss_from_c(c: torch.Tensor, lam: float, denom: float) -> torch.Tensor:
    """L_TF of a given D x D cross-correlation (a federated site passes the mixed C)."""
    return _redundancy(c, lam) / (denom * c.shape[0])


def tt_loss(z_a: torch.Tensor, z_b: torch.Tensor, lam: float, denom: float) -> torch.Tensor:
    """Text-to-text alignment: S = Z_A Z_B^T / N (N x N, rows not normalised).

    Returns raw(S) / (denom * N). Paper: denom = 2 * 50 = 100.
    """
    n = z_a.shape[0]
    s = z_a @ z_b.t() / n
    return _redundancy(s, lam) / (denom * n)
