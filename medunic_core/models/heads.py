"""Projection heads P_V, P_l and P_d (MEDUNIC.md, "Model")."""

from __future__ import annotations

import torch
from torch import nn

from medunic_core.align import AlignableBatchNorm1d


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm(affine=False).

    The final affine-free BatchNorm standardises every output dimension over the batch,
    which is what makes C = Z_A^T Z_B / N a correlation matrix in CTR. It is kept as its
    own module (``norm``); both BatchNorms are alignable, so that federated code can
    mix their statistics across language communities (medunic_core.align).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            AlignableBatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = AlignableBatchNorm1d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_dim) -> (N, out_dim), standardised per dimension in training."""
        return self.norm(self.mlp(x))
