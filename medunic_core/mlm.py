"""Stage 2 of MEDUNIC.md: masked-language post-training of the text encoder (``medunic mlm``).

Shuffled reports of every language, 15% of the tokens masked (80% [MASK], 10% a random
token, 10% kept), AdamW with warm-up and cosine decay. The result is the base encoder
(no MLM head) saved with ``save_pretrained`` next to the run's tokenizer, so that VLP
starts from it with ``model.text.pretrained=OUT/text_encoder train.tokenizer=OUT/tokenizer``.

With ``dp.sgd.enabled`` the stage is DP-SGD (medunic_core.privacy): Poisson-sampled
batches, the loss a mean of per-report losses, and the epsilon spent logged with every
metrics line and written to ``privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

from medunic_core.checkpoint import check_finite
from medunic_core.cli import add_config_args
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import METRICS_FILE
from medunic_core.data.manifest import read_manifest
from medunic_core.models.encoders import bert_config, load_pretrained_text
from medunic_core.errors import SiteDataError
from medunic_core.privacy import PrivateTraining, make_private
from medunic_core.round_state import RoundState
from medunic_core.loop import LocalResult, StepRecord, train_local
from medunic_core.optim import Stepper, build_optimizer, cosine_with_warmup, round_seed, seed_everything
from medunic_core.train import prepare_tokenizer, resolve_device

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


def per_report_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over reports of each report's mean masked-token loss (DP-SGD needs a mean of
    per-sample losses; a report without a masked token adds zero)."""
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum(1)
    return (token.sum(1) / counted.clamp(min=1)).mean()


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices, reshuffled every pass over the reports."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def _poisson_batches(private: PrivateTraining):
    """Endless Poisson-sampled batches of indices from Opacus's loader (may be empty)."""
    while True:
        for (indices,) in private.loader:
            yield indices.tolist()


class UntiedMlm(nn.Module):
    """The encoder with an untied MLM head of standard layers, for DP-SGD: Opacus computes
    per-sample gradients of Linear, LayerNorm and Embedding with its own hooks, but not of
    Hugging Face's head, whose decoder shares the token embeddings and a bare bias."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        hidden, vocab = encoder.config.hidden_size, encoder.config.vocab_size
        self.encoder = encoder
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.decoder = nn.Linear(hidden, vocab)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # explicit per-report position and segment ids: BERT's defaults are one shared row,
        # and Opacus needs every embedding lookup to carry the batch dimension
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).contiguous()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        return self.decoder(self.transform(hidden))


def mlm_model(cfg: MedUniCConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    """HF's masked-LM model, or under DP-SGD the encoder with an :class:`UntiedMlm` head."""
    text = cfg.model.text
    if cfg.dp.sgd.enabled:
        if text.pretrained:
            encoder = load_pretrained_text(text.pretrained, vocab_size, AutoModel, add_pooling_layer=False)
        else:
            encoder = BertModel(bert_config(text, vocab_size, pad_token_id), add_pooling_layer=False)
        return UntiedMlm(encoder)
    if text.pretrained:
        return load_pretrained_text(text.pretrained, vocab_size, AutoModelForMaskedLM)
    return BertForMaskedLM(bert_config(text, vocab_size, pad_token_id))


def mlm_batch_loss(
    model: nn.Module, texts: list[str], tokenizer, cfg: MedUniCConfig, generator: torch.Generator,
    device: torch.device, per_report: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM loss of one batch of reports, and the token ids it read (its input rows)."""
    tok = tokenizer(texts, padding=True, truncation=True, max_length=cfg.model.text.max_length,
                    return_tensors="pt", return_special_tokens_mask=True)
    special = tok["special_tokens_mask"].bool() | (tok["attention_mask"] == 0)
    inputs, labels = mask_tokens(tok["input_ids"], special, tokenizer.mask_token_id, len(tokenizer),
                                 cfg.mlm.mask_prob, generator)
    inputs, mask, labels = inputs.to(device), tok["attention_mask"].to(device), labels.to(device)
    if per_report:  # DP-SGD: a mean of per-report losses (UntiedMlm returns logits)
        loss = per_report_loss(model(input_ids=inputs, attention_mask=mask), labels)
    else:
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
    return loss, tok["input_ids"][tok["attention_mask"].bool()]


def mlm_stepper(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: MedUniCConfig, total_steps: int,
                first_step: int = 0, clip: bool = True) -> Stepper:
    """The MLM optimizer step: warm-up + cosine to 0 over ``total_steps``, clipping unless
    DP-SGD clips per report itself."""
    return Stepper(model, optimizer, cosine_with_warmup(cfg.mlm.warmup_steps, total_steps, 0.0),
                   cfg.train.grad_clip if clip else None, first_step=first_step)


def train_mlm_site(
    model: nn.Module, reports: list[str], tokenizer, cfg: MedUniCConfig, server_round: int,
    device: torch.device = torch.device("cpu"), carried: Optional[RoundState] = None,
) -> tuple[LocalResult, np.ndarray, int]:
    """One federated round of MLM at a site (medunic_core.loop): ``fed.local_steps`` steps on
    its own reports, with the learning rate the centralized schedule (``mlm.*`` over
    ``fed.rounds x fed.local_steps`` steps) has at those steps; the token rows it read and
    the number of distinct reports behind the round (the site's release floors).
    With ``carried`` and ``fed.site_optimizer = keep`` the AdamW moments carry over rounds."""
    if not reports:
        raise SiteDataError("no reports to post-train the text encoder on")
    fed = cfg.fed
    generator = torch.Generator().manual_seed(round_seed(cfg.train.seed, server_round))
    batches = _shuffled_batches(len(reports), min(cfg.mlm.batch_size, len(reports)), generator)
    model.to(device).train()
    first = (server_round - 1) * fed.local_steps
    stepper = mlm_stepper(model, build_optimizer(model, cfg.mlm.lr, cfg.mlm.weight_decay), cfg,
                          fed.rounds * fed.local_steps, first)
    previous = carried.load(server_round) if carried is not None else None
    if previous is not None and fed.site_optimizer == "keep":
        stepper.load_optimizer_state(previous)
    rows = np.zeros(len(tokenizer), dtype=bool)
    drawn: set[int] = set()

    def loss_fn(batch: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        loss, ids = mlm_batch_loss(model, [reports[i] for i in batch], tokenizer, cfg, generator, device)
        rows[ids.unique().numpy()] = True
        drawn.update(batch)
        return {"loss": loss}, len(batch)

    result = train_local(batches, loss_fn, stepper, fed.local_steps, first_step=first,
                         where=f"MLM round {server_round}")
    if carried is not None:
        carried.save(server_round, stepper.state_dict())
    return result, rows, len(drawn)


@dataclass
class MlmResult:
    text_encoder: Path  # save_pretrained folder of the base encoder
    tokenizer: Path
    final_loss: float
    privacy: Optional[dict[str, float]] = None  # epsilon, delta, noise... under dp.sgd


def train_mlm(cfg: MedUniCConfig, progress: bool = True) -> MlmResult:
    """Post-train the text encoder on the manifest's train-split reports."""
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.mlm.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    records = read_manifest(cfg.data.manifest, cfg.data.langs, split="train")
    tokenizer = prepare_tokenizer(cfg, [(r.report, r.lang) for r in records], out_dir)
    model = mlm_model(cfg, len(tokenizer), tokenizer.pad_token_id)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.mlm.lr, cfg.mlm.weight_decay)
    reports = [r.report for r in records]
    generator = torch.Generator().manual_seed(cfg.train.seed)
    private: Optional[PrivateTraining] = None
    if cfg.dp.sgd.enabled:
        indices = torch.utils.data.TensorDataset(torch.arange(len(reports)))
        loader = torch.utils.data.DataLoader(indices, batch_size=cfg.mlm.batch_size, generator=generator)
        private = make_private(model, optimizer, loader, cfg.dp.sgd, cfg.mlm.steps)
        model, optimizer = private.model, private.optimizer
        batches = _poisson_batches(private)
        log.info("DP-SGD: noise multiplier %.3f, sample rate %.4f, delta %g", private.noise_multiplier,
                 private.sample_rate, private.delta)
    else:
        batches = _shuffled_batches(len(reports), cfg.mlm.batch_size, generator)
    stepper = mlm_stepper(model, optimizer, cfg, cfg.mlm.steps, clip=private is None)
    metrics = (out_dir / METRICS_FILE).open("w")

    def loss_fn(batch: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        # an empty Poisson batch still takes a (noise-only) DP step: one report with weight 0
        weight, batch = (1.0, batch) if batch else (0.0, [0])
        loss, _ = mlm_batch_loss(model, [reports[i] for i in batch], tokenizer, cfg, generator, device,
                                 per_report=private is not None)
        return {"loss": weight * loss}, len(batch) if weight else 0

    last = {"loss": float("nan")}  # of the last non-empty batch

    def on_step(record: StepRecord) -> bool:
        if record.examples:
            last["loss"] = record.parts["loss"]
        if record.step % cfg.mlm.log_every == 0 or record.step == cfg.mlm.steps:
            row = {"step": record.step, "mlm_loss": last["loss"], "lr": record.lr}
            if private is not None:
                row["dp_epsilon"] = private.epsilon()
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        return False

    train_local(batches, loss_fn, stepper, cfg.mlm.steps, on_step=on_step, where="MLM", progress=progress)
    metrics.close()
    loss_value = last["loss"]
    encoder_dir = out_dir / "text_encoder"
    trained = private.model._module if private is not None else model  # Opacus wraps the model
    check_finite(trained.state_dict(), f"MLM text encoder for {encoder_dir}")
    trained.base_model.save_pretrained(encoder_dir)  # the encoder without the MLM head
    privacy = None
    if private is not None:
        privacy = {"mechanism": "DP-SGD (Opacus), per report", **private.summary()}
        (out_dir / "privacy.json").write_text(json.dumps(privacy, indent=1))
    return MlmResult(encoder_dir, Path(cfg.train.tokenizer or out_dir / "tokenizer"), loss_value, privacy)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mlm", help="masked-language post-training of the text encoder")
    add_config_args(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, config_file=args.config)
    result = train_mlm(cfg, progress=not args.no_progress)
    print(f"MLM done, final loss {result.final_loss:.3f}")
    if result.privacy:
        p = result.privacy
        print(f"DP-SGD: epsilon {p['epsilon']:.3f} at delta {p['delta']:g} after {p['steps']} steps "
              f"(noise multiplier {p['noise_multiplier']:.3f}, sample rate {p['sample_rate']:.4f})")
    print(f"use it: model.text.pretrained={result.text_encoder} train.tokenizer={result.tokenizer}")
    return 0
