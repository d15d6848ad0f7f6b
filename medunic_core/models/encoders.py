"""The two towers: an image encoder from timm and a text encoder from transformers."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from medunic_core.checkpoint import load_state_dict_strict
from medunic_core.config import ImageConfig, TextConfig
from medunic_core.errors import CheckpointMismatchError, ConfigError


class ImageEncoder(nn.Module):
    """F_v: any timm model without its classifier; ViTs give [CLS], CNNs their pooled map."""

    def __init__(self, cfg: ImageConfig) -> None:
        super().__init__()
        kwargs = dict(cfg.kwargs)
        try:
            self.backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"model.image: timm cannot build '{cfg.name}' with kwargs {kwargs}: {exc}"
            ) from exc
        if getattr(self.backbone, "cls_token", None) is not None:
            # Med-UniC uses the ViT's [CLS] token, not the mean of patch tokens.
            self.backbone.reset_classifier(0, global_pool="token")
        self.out_dim: int = int(self.backbone.num_features)
        if cfg.checkpoint:
            state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
            load_state_dict_strict(self.backbone, state, source=str(cfg.checkpoint))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> features (N, out_dim)."""
        return self.backbone(images)


class TextEncoder(nn.Module):
    """F_l: a BERT-style encoder; the report embedding is the last layer's [CLS] state."""

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_token_id: int = 0) -> None:
        super().__init__()
        if cfg.pretrained:
            self.bert = self._load_pretrained(cfg.pretrained, vocab_size)
        else:
            if cfg.hidden_size % cfg.num_heads:
                raise ConfigError(
                    f"model.text.hidden_size={cfg.hidden_size} is not a multiple of "
                    f"model.text.num_heads={cfg.num_heads}"
                )
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=max(512, cfg.max_length),
                hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout,
                pad_token_id=pad_token_id,
            )
            self.bert = BertModel(config, add_pooling_layer=False)
        self.out_dim: int = int(self.bert.config.hidden_size)
        self.freeze(cfg.freeze_embeddings, cfg.freeze_layers)

    @staticmethod
    def _load_pretrained(folder: str, vocab_size: int) -> PreTrainedModel:
        if not Path(folder).is_dir():
            raise ConfigError(f"model.text.pretrained={folder} is not a local folder")
        model = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        current = model.get_input_embeddings().num_embeddings
        if vocab_size < current:
            raise CheckpointMismatchError(
                f"text encoder {folder} has {current} token embeddings but the tokenizer only "
                f"{vocab_size}; use the tokenizer built from this encoder's vocabulary"
            )
        if vocab_size > current:
            # The cross-lingual vocabulary appends tokens: grow the matrix, old rows unchanged.
            from medunic_core.vocab import resize_token_embeddings

            resize_token_embeddings(model, vocab_size)
        return model

    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def freeze(self, embeddings: bool, num_layers: int) -> None:
        """Freeze the embeddings and the first ``num_layers`` layers (paper: 9 of 12).

        Dropout stays active in frozen layers: CTR's two views of a report differ only
        through dropout.
        """
        if num_layers > len(self.layers()):
            raise ConfigError(
                f"model.text.freeze_layers={num_layers} but the encoder has {len(self.layers())} layers"
            )
        if embeddings:
            self.bert.embeddings.requires_grad_(False)
        for layer in list(self.layers())[:num_layers]:
            layer.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (N, L) -> [CLS] state of the last layer (N, hidden)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]
