"""Symmetric InfoNCE, used for both L_CVL (image-text) and L_SSV (image-image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on cosine similarity (MEDUNIC.md, L_CVL and L_SSV).

    a, b: (N, d); row n of ``a`` and row n of ``b`` are a positive pair and the other
    rows of the batch are negatives. Returns the mean of the a->b and b->a cross-entropies
    over logits cos(a_i, b_j) / temperature.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
