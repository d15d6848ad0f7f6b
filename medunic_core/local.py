"""One site's local training for one federated round (no Flower here).

A site trains the received model for ``fed.local_steps`` optimizer steps on its own
pairs, with the learning rate the centralized schedule would have at those steps, and
returns what may leave the site: the updated weights (by the caller), the number of
pairs seen, mean losses, this round's alignment sums of its community and which token
rows its batches used. With ``align.train_norm = mixed`` the text-path BatchNorms and
CTR's C mix the live batch with the other communities' stored moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medunic_core.align import Aligner, AlignmentState
from medunic_core.config import MedUniCConfig
from medunic_core.data.dataset import EpochSampler, PairDataset, TextCollator, prepare_images
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.data.transforms import TwoViewTransform
from medunic_core.errors import SiteDataError
from medunic_core.losses import check_finite_loss
from medunic_core.models import MedUniC
from medunic_core.train import build_optimizer, cosine_with_warmup, forward_loss

EPOCHS_PER_ROUND = 10_000  # epoch ids of round r start at r * this: distinct shuffles per round


@dataclass
class LocalResult:
    """What one round of local training produced."""

    num_examples: int
    metrics: dict[str, float]
    alignment: AlignmentState
    token_rows: np.ndarray  # bool, one per vocabulary row: used by this round's batches
    history: list[dict[str, float]] = field(default_factory=list)


def site_records(cfg: MedUniCConfig, site: str, lang: str, split: str, manifest: Optional[str] = None) -> list[Record]:
    """The rows of one site and split; a row of another language is an error, by id."""
    path = manifest or cfg.data.manifest
    records = [r for r in read_manifest(path, None, split=split) if r.site == site]
    wrong = [r.id for r in records if r.lang != lang]
    if wrong:
        raise SiteDataError(
            f"site '{site}' is declared '{lang}' but {len(wrong)} of its rows in {path} are not: "
            f"{', '.join(wrong[:10])}"
        )
    if not records:
        raise SiteDataError(f"{path} has no '{split}' rows for site '{site}'")
    return records


def _site_loader(records: Sequence[Record], cache: ImageCache, tokenizer, cfg: MedUniCConfig, seed: int):
    """(sampler, loader) of full training batches of two image views and the reports."""
    img = cfg.model.image
    dataset = PairDataset(records, cache, TwoViewTransform(img.size, img.mean, img.std), seed)
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=TextCollator(tokenizer, cfg.model.text.max_length), drop_last=True,
    )
    return sampler, loader


def train_site(
    model: MedUniC,
    records: Sequence[Record],
    cache: ImageCache,
    tokenizer,
    cfg: MedUniCConfig,
    server_round: int,
    others: Optional[AlignmentState] = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> LocalResult:
    """Train ``model`` in place for one round on one community's pairs."""
    fed, tr = cfg.fed, cfg.train
    records, _ = prepare_images(records, cache, cfg.data.max_bad_fraction, progress=False)
    langs = {r.lang for r in records}
    if len(langs) != 1:
        raise SiteDataError(f"a site trains on one language community, got {sorted(langs)}")
    if len(records) < tr.batch_size:
        raise SiteDataError(f"{len(records)} training pairs are fewer than one batch of {tr.batch_size}")
    sampler, loader = _site_loader(records, cache, tokenizer, cfg, tr.seed + 7919 * server_round)

    model.to(device).train()
    mode = "mixed" if cfg.align.train_norm == "mixed" and others is not None and others.communities else "local"
    aligner = Aligner(model, mode=mode, others=others, include_image=cfg.align.image)
    optimizer = build_optimizer(model, tr.lr, tr.weight_decay)
    total = fed.rounds * fed.local_steps
    factor = cosine_with_warmup(tr.warmup_steps, total, tr.min_lr_ratio)
    first = (server_round - 1) * fed.local_steps
    anchor = (
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if fed.strategy == "fedprox" and fed.proximal_mu > 0
        else None
    )
    token_rows = np.zeros(model.text_encoder.bert.config.vocab_size, dtype=bool)
    sums: dict[str, float] = {}
    history: list[dict[str, float]] = []
    seen, step, micro, epoch = 0, 0, 0, server_round * EPOCHS_PER_ROUND
    bar = tqdm(total=fed.local_steps, desc=f"round {server_round}", disable=not progress)
    with aligner.attached():
        while step < fed.local_steps:
            sampler.set_epoch(epoch)
            for batch in loader:
                parts = forward_loss(model, batch, cfg, device, aligner=aligner)
                check_finite_loss(parts, f"round {server_round}, local step {step + 1}")
                loss = parts["loss"]
                if anchor is not None:
                    prox = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
                    loss = loss + fed.proximal_mu / 2 * prox
                (loss / tr.accum_steps).backward()
                token_rows[batch["input_ids"][batch["attention_mask"].bool()].unique().numpy()] = True
                seen += len(batch["report"])
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                micro += 1
                if micro % tr.accum_steps:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = tr.lr * factor(first + step)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                history.append({"step": first + step, "loss": float(parts["loss"].detach())})
                if step >= fed.local_steps:
                    break
            epoch += 1
    bar.close()
    metrics: dict[str, Any] = {k: v / max(micro, 1) for k, v in sums.items()}
    metrics["lr"] = tr.lr * factor(first + step - 1)
    return LocalResult(seen, metrics, aligner.collected, token_rows, history)


@torch.no_grad()
def collect_statistics(
    model: MedUniC,
    records: Sequence[Record],
    cache: ImageCache,
    tokenizer,
    cfg: MedUniCConfig,
    batches: int,
    device: torch.device = torch.device("cpu"),
) -> AlignmentState:
    """A statistics-only pass (``align.round1 = stats``): the alignment sums of a few
    training-mode batches, with no update (BatchNorm running statistics are restored)."""
    records, _ = prepare_images(records, cache, progress=False)
    _, loader = _site_loader(records, cache, tokenizer, cfg, cfg.train.seed)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    aligner = Aligner(model, mode="local", include_image=cfg.align.image)
    with aligner.attached():
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            forward_loss(model, batch, cfg, device, aligner=aligner)
    model.load_state_dict(saved)
    return aligner.collected
