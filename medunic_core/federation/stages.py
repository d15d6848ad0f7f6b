"""The federated stages as both sides see them (DESIGN.md, "Stages"): the model a stage
trains, the message a site answers, the token-embedding matrix whose rows are averaged
over the sites that used them, and how many examples one site's round can have seen.
client/app.py answers the stages; server/stages.py runs them.
"""

from __future__ import annotations

from torch import nn

from medunic_core.config import MedUniCConfig
from medunic_core.exchange import TOKEN_EMBEDDINGS
from medunic_core.federation import payload as P
from medunic_core.mlm import mlm_model
from medunic_core.models import create_model
from medunic_core.optim import seed_everything

VOCAB, MLM, VLP = "vocab", "mlm", "vlp"
MESSAGE = {VOCAB: P.QUERY_VOCAB, MLM: P.TRAIN_MLM, VLP: P.TRAIN}


def stage_model(cfg: MedUniCConfig, tokenizer, stage: str) -> nn.Module:
    """The model of a weight stage, initialised identically at every site and at the
    coordinator (seeded with ``train.seed``): frozen layers never travel, so they must agree."""
    seed_everything(cfg.train.seed)
    if stage == MLM:
        return mlm_model(cfg, len(tokenizer), tokenizer.pad_token_id)
    return create_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)


def token_key(model: nn.Module, stage: str) -> str:
    """The travelling name of the token-embedding matrix of a stage's model."""
    if stage == MLM:
        return f"{model.base_model_prefix}.embeddings.word_embeddings.weight"
    return TOKEN_EMBEDDINGS


def max_examples(cfg: MedUniCConfig, stage: str) -> int:
    """The most examples one site's round can report: local steps x batch (x accumulation)."""
    if stage == MLM:
        return cfg.fed.local_steps * cfg.mlm.batch_size
    return cfg.fed.local_steps * cfg.train.batch_size * cfg.train.accum_steps
