"""Stage 2 of MEDUNIC.md: masked-language post-training of the text encoder (``medunic mlm``).

Shuffled reports of every language, 15% of the tokens masked (80% [MASK], 10% a random
token, 10% kept), AdamW with warm-up and cosine decay. The result is the base encoder
(no MLM head) saved with ``save_pretrained`` next to the run's tokenizer, so that VLP
starts from it with ``model.text.pretrained=OUT/text_encoder train.tokenizer=OUT/tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from medunic_core.cli import add_config_args
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import METRICS_FILE
from medunic_core.data.manifest import read_manifest
from medunic_core.models.encoders import bert_config, load_pretrained_text
from medunic_core.train import build_optimizer, cosine_with_warmup, prepare_tokenizer, resolve_device, seed_everything

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens the loss skips


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (inputs, labels) with labels = IGNORE_INDEX outside the chosen tokens.

    Of the chosen tokens (``prob`` of the non-special ones) 80% become [MASK], 10% a
    random token and 10% stay as they are.
    """
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = (draw < prob) & ~special_mask
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    kind = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (kind < 0.8)] = mask_token_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (kind >= 0.8) & (kind < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels


@dataclass
class MlmResult:
    text_encoder: Path  # save_pretrained folder of the base encoder
    tokenizer: Path
    final_loss: float


def train_mlm(cfg: MedUniCConfig, progress: bool = True) -> MlmResult:
    """Post-train the text encoder on the manifest's train-split reports."""
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.mlm.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    records = read_manifest(cfg.data.manifest, cfg.data.langs, split="train")
    tokenizer = prepare_tokenizer(cfg, [(r.report, r.lang) for r in records], out_dir)
    text = cfg.model.text
    if text.pretrained:
        model = load_pretrained_text(text.pretrained, len(tokenizer), AutoModelForMaskedLM)
    else:
        model = BertForMaskedLM(bert_config(text, len(tokenizer), tokenizer.pad_token_id))
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.mlm.lr, cfg.mlm.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.mlm.warmup_steps, cfg.mlm.steps, 0.0)
    )
    reports = [r.report for r in records]
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order: list[int] = []
    metrics = (out_dir / METRICS_FILE).open("w")
    loss_value = float("nan")
    for step in tqdm(range(1, cfg.mlm.steps + 1), desc="MLM", disable=not progress):
        while len(order) < cfg.mlm.batch_size:  # reshuffle every pass over the reports
            order += torch.randperm(len(reports), generator=generator).tolist()
        batch, order = order[: cfg.mlm.batch_size], order[cfg.mlm.batch_size :]
        tok = tokenizer(
            [reports[i] for i in batch], padding=True, truncation=True, max_length=text.max_length,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        special = tok["special_tokens_mask"].bool() | (tok["attention_mask"] == 0)
        inputs, labels = mask_tokens(
            tok["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), cfg.mlm.mask_prob, generator
        )
        out = model(input_ids=inputs.to(device), attention_mask=tok["attention_mask"].to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value = float(out.loss.detach())
        if step % cfg.mlm.log_every == 0 or step == cfg.mlm.steps:
            metrics.write(json.dumps({"step": step, "mlm_loss": loss_value, "lr": scheduler.get_last_lr()[0]}) + "\n")
            metrics.flush()
    metrics.close()
    encoder_dir = out_dir / "text_encoder"
    model.base_model.save_pretrained(encoder_dir)  # the encoder without the MLM head
    return MlmResult(encoder_dir, Path(cfg.train.tokenizer or out_dir / "tokenizer"), loss_value)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mlm", help="masked-language post-training of the text encoder")
    add_config_args(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, config_file=args.config)
    result = train_mlm(cfg, progress=not args.no_progress)
    print(f"MLM done, final loss {result.final_loss:.3f}")
    print(f"use it: model.text.pretrained={result.text_encoder} train.tokenizer={result.tokenizer}")
    return 0
