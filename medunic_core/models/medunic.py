"""The Med-UniC model: two towers, three heads, one forward that returns named embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from medunic_core.config import ModelConfig
from medunic_core.models.encoders import ImageEncoder, TextEncoder
from medunic_core.models.heads import ProjectionHead


class MedUniC(nn.Module):
    """F_v + P_V for images, F_l + P_l (alignment) and P_d (CTR) for reports."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(cfg.image)
        self.text_encoder = TextEncoder(cfg.text, vocab_size, pad_token_id)
        h = cfg.head
        self.image_head = ProjectionHead(self.image_encoder.out_dim, h.hidden_dim, h.embed_dim)
        self.text_head = ProjectionHead(self.text_encoder.out_dim, h.hidden_dim, h.embed_dim)
        self.ctr_head = ProjectionHead(self.text_encoder.out_dim, h.hidden_dim, h.ctr_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> v = P_V(F_v(x)) (N, embed_dim)."""
        return self.image_head(self.image_encoder(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) -> t = P_l(F_l(report)) (N, embed_dim)."""
        return self.text_head(self.text_encoder(input_ids, attention_mask))

    def forward(
        self,
        images: torch.Tensor,
        images_strong: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ctr: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Embeddings for the three losses.

        Returns ``image`` (weak view) and ``image_strong`` for L_CVL/L_SSV (no
        ``image_strong`` when ``images_strong`` is None: a run without L_SSV), ``text`` for
        L_CVL, and with ``ctr`` the two dropout views ``ctr_a``, ``ctr_b`` = P_d(h_A),
        P_d(h_B) for L_CTR. The two image views go through F_v in one call (F_v has no
        batch statistics for a ViT) but through P_V separately, so that each view is
        standardised over its own batch as in the paper.
        """
        n = images.shape[0]
        feats = self.image_encoder(images if images_strong is None else torch.cat([images, images_strong]))
        out = {"image": self.image_head(feats[:n])}
        if images_strong is not None:
            out["image_strong"] = self.image_head(feats[n:])
        h_a = self.text_encoder(input_ids, attention_mask)
        out["text"] = self.text_head(h_a)
        if ctr:
            h_b = self.text_encoder(input_ids, attention_mask)  # second dropout view
            out["ctr_a"] = self.ctr_head(h_a)
            out["ctr_b"] = self.ctr_head(h_b)
        return out
