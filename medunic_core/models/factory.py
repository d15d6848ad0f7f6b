"""The one place that builds a model from a config (and optionally a checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from medunic_core.checkpoint import load_checkpoint, load_state_dict_strict
from medunic_core.config import ModelConfig
from medunic_core.models.medunic import MedUniC


def create_model(
    cfg: ModelConfig,
    vocab_size: int,
    pad_token_id: int = 0,
    checkpoint: Optional[str | Path] = None,
) -> MedUniC:
    """Build Med-UniC for a tokenizer of ``vocab_size`` entries; load weights strictly."""
    model = MedUniC(cfg, vocab_size, pad_token_id)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        load_state_dict_strict(model, state.get("model", state), source=str(checkpoint))
    return model


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters that train (frozen layers never reach the optimizer or the wire)."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
