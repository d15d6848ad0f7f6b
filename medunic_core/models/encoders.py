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
from medunic_core.vocab import resize_token_embeddings


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
        # Models with a conv head after pooling (MobileNetV3, ...) output head_hidden_size,
        # not num_features (the pre-pool channels).
        self.out_dim: int = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        if cfg.checkpoint:
            state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
            load_state_dict_strict(self.backbone, state, source=str(cfg.checkpoint))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> features (N, out_dim)."""
        return self.backbone(images)


def bert_config(cfg: TextConfig, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
    """A BERT config from our text settings (used by VLP and by the MLM warm-up)."""
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"model.text.hidden_size={cfg.hidden_size} is not a multiple of "
            f"model.text.num_heads={cfg.num_heads}"
        )
    return BertConfig(
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


def load_pretrained_text(folder: str | Path, vocab_size: int, model_class=AutoModel, **kwargs) -> PreTrainedModel:
    """A local Hugging Face text model whose token embeddings fit a tokenizer of ``vocab_size``.

    A cross-lingual vocabulary only appends tokens, so a larger tokenizer grows the
    embedding matrix (old rows unchanged); a smaller one means the wrong tokenizer.
    """
    if not Path(folder).is_dir():
        raise ConfigError(f"model.text.pretrained={folder} is not a local folder")
    model = model_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    current = model.get_input_embeddings().num_embeddings
    if vocab_size < current:
        raise CheckpointMismatchError(
            f"text encoder {folder} has {current} token embeddings but the tokenizer only "
            f"{vocab_size}; use the tokenizer built from this encoder's vocabulary"
        )
    if vocab_size > current:
        resize_token_embeddings(model, vocab_size)
    return model


class TextEncoder(nn.Module):
    """F_l: a BERT-style encoder; the report embedding is the last layer's [CLS] state
    (the paper's) or, with ``pooling="mean"``, the mean of its token states over the mask.

    A BERT trained from scratch for a few hundred steps puts much less of a report into
    [CLS] than into its tokens (README, "Status"); mean pooling reads the tokens directly.
    """

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_token_id: int = 0) -> None:
        super().__init__()
        if cfg.pretrained:
            self.bert = load_pretrained_text(cfg.pretrained, vocab_size, AutoModel, add_pooling_layer=False)
        else:
            self.bert = BertModel(bert_config(cfg, vocab_size, pad_token_id), add_pooling_layer=False)
        self.out_dim: int = int(self.bert.config.hidden_size)
        self.pooling = cfg.pooling
        self.freeze(cfg.freeze_embeddings, cfg.freeze_layers)

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
        """input_ids, attention_mask (N, L) -> the pooled last layer (N, hidden)."""
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
