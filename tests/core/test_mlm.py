"""MLM warm-up: BERT masking proportions, and a post-trained encoder that VLP loads."""

from __future__ import annotations

import json

import torch
from transformers import AutoModel

from medunic_core.config import load_config
from medunic_core.mlm import IGNORE_INDEX, mask_tokens, train_mlm
from medunic_core.models import create_model
from medunic_core.vocab import load_tokenizer


def test_mask_tokens_follows_80_10_10_and_spares_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 100), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, special, mask_token_id=4, vocab_size=1000, prob=0.15, generator=g)
    chosen = labels != IGNORE_INDEX
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])
    assert abs(chosen.float().mean().item() - 0.15 * 98 / 100) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02  # (+ rare random == original)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_mlm_loss_falls_and_vlp_starts_from_the_encoder(synthetic_data, train_overrides, tmp_path):
    overrides = [
        *train_overrides(synthetic_data, tmp_path / "vlp"),
        f"mlm.out_dir={tmp_path / 'mlm'}",
        "mlm.steps=40",
        "mlm.log_every=5",
        "mlm.warmup_steps=5",
        "mlm.lr=1e-3",
    ]
    result = train_mlm(load_config("tiny", overrides), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] - 0.5
    tokenizer = load_tokenizer(result.tokenizer)
    cfg = load_config(
        "tiny", [*overrides, f"model.text.pretrained={result.text_encoder}", f"train.tokenizer={result.tokenizer}"]
    )
    model = create_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    saved = AutoModel.from_pretrained(str(result.text_encoder), add_pooling_layer=False)
    ours = model.text_encoder.bert.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in saved.state_dict().items())
