"""Projection heads P_V, P_l and P_d (MEDUNIC.md, "Model")."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm(affine=False).

    The final affine-free BatchNorm standardises every output dimension over the batch,
    which is what makes C = Z_A^T Z_B / N a correlation matrix in CTR. It is kept as its
    own module (``norm``) so that federated code can replace its statistics.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = nn.BatchNorm1d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_dim) -> (N, out_dim), standardised per dimension in training."""
        return self.norm(self.mlp(x))
