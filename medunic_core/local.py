"""One site's local training for one federated round (no Flower here).

A site trains the received model for ``fed.local_steps`` optimizer steps on its own
pairs, with the learning rate the centralized schedule would have at those steps, and
returns what may leave the site: the updated weights (by the caller), the number of
pairs seen, mean losses, this round's alignment sums of its community (of each, at a site
whose reports come in several languages) and which token rows its batches used. With
``align.train_norm = mixed`` the text-path BatchNorms and CTR's C mix the live batch with
the stored moments of the communities it lacks (a site of every language: none, plain
BatchNorm as in centralized training); with ``local`` each language's rows are standardised
on their own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from medunic_core.align import Aligner, AlignmentState
from medunic_core.checkpoint import rng_state, set_rng_state
from medunic_core.config import MedUniCConfig
from medunic_core.data.dataset import pair_stream, prepare_images
from medunic_core.data.language import site_languages
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import SiteDataError
from medunic_core.loop import train_local
from medunic_core.models import MedUniC
from medunic_core.round_state import RoundState
from medunic_core.train import forward_loss, vlp_stepper

EPOCHS_PER_ROUND = 10_000  # epoch ids of round r start at r * this: distinct shuffles per round


@dataclass
class SiteRound:
    """What one round of local training produced and may leave the site (with the weights)."""

    num_examples: int
    metrics: dict[str, float]  # mean of each loss part over the round, and the last step's lr
    alignment: AlignmentState
    token_rows: np.ndarray  # bool, one per vocabulary row: used by this round's batches
    drawn: dict[str, int]  # distinct pairs behind the round, per language (the site's release floors)


def site_records(cfg: MedUniCConfig, site: str, lang: str, split: str, manifest: Optional[str] = None) -> list[Record]:
    """The rows of one site and split; a row of a language the site does not hold (``lang``:
    its languages, e.g. ``en`` or ``en+es``) is an error, by id."""
    path = manifest or cfg.data.manifest
    records = [r for r in read_manifest(path, None, split=split) if r.site == site]
    wrong = [r.id for r in records if r.lang not in site_languages(lang)]
    if wrong:
        raise SiteDataError(
            f"site '{site}' is declared '{lang}' but {len(wrong)} of its rows in {path} are not: "
            f"{', '.join(wrong[:10])}"
        )
    if not records:
        raise SiteDataError(f"{path} has no '{split}' rows for site '{site}'")
    return records


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
    carried: Optional[RoundState] = None,
) -> SiteRound:
    """Train ``model`` in place for one round on the site's pairs (medunic_core.loop):
    ``fed.local_steps`` steps at their place on the centralized schedule of ``fed.rounds x
    fed.local_steps`` steps; with FedProx, the proximal term joins the loss.

    With ``carried`` (medunic_core.round_state) the round continues the site's previous one:
    its data stream and RNG, and with ``fed.site_optimizer = keep`` its AdamW moments. A
    one-site federation then trains exactly as centralized training on its data."""
    fed, tr = cfg.fed, cfg.train
    records, _ = prepare_images(records, cache, cfg.data.max_bad_fraction, progress=False)
    if len(records) < tr.batch_size:
        raise SiteDataError(f"{len(records)} training pairs are fewer than one batch of {tr.batch_size}")
    stream = pair_stream(records, cache, tokenizer, tr.batch_size, tr.accum_steps, cfg.model.text.max_length,
                         cfg.model.image, tr.seed, cfg.data.num_workers, strong_view=cfg.loss.ssv_weight > 0)
    previous = carried.load(server_round) if carried is not None else None
    if previous is not None:
        stream.epoch, stream.batch = previous["stream"]
        set_rng_state(previous["rng"])
    elif server_round > 1:  # no earlier round here: a fresh order, not round 1's again
        stream.epoch = server_round * EPOCHS_PER_ROUND

    model.to(device).train()
    mode = "mixed" if cfg.align.train_norm == "mixed" else "local"
    aligner = Aligner(model, mode=mode, others=others, include_image=cfg.align.image)
    first = (server_round - 1) * fed.local_steps
    stepper = vlp_stepper(model, cfg, fed.rounds * fed.local_steps, device, first_step=first)
    if previous is not None and fed.site_optimizer == "keep":
        stepper.load_optimizer_state(previous)
    anchor = (
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if fed.strategy == "fedprox" and fed.proximal_mu > 0
        else None
    )
    token_rows = np.zeros(model.text_encoder.bert.config.vocab_size, dtype=bool)
    drawn: set[int] = set()

    def loss_fn(batch: dict) -> tuple[dict[str, torch.Tensor], int]:
        parts = forward_loss(model, batch, cfg, device, aligner=aligner)
        if anchor is not None:
            parts["prox_loss"] = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
            parts["loss"] = parts["loss"] + fed.proximal_mu / 2 * parts["prox_loss"]
        token_rows[batch["input_ids"][batch["attention_mask"].bool()].unique().numpy()] = True
        drawn.update(batch["index"].tolist())
        return parts, len(batch["report"])

    with aligner.attached():
        result = train_local(stream, loss_fn, stepper, fed.local_steps, first_step=first,
                             where=f"round {server_round}", progress=progress)
    if carried is not None:
        carried.save(server_round, {**stepper.state_dict(), "stream": (stream.epoch, stream.batch), "rng": rng_state()})
    return SiteRound(result.num_examples, result.metrics, aligner.collected, token_rows, _by_language(records, drawn))


def _by_language(records: Sequence[Record], indices: set[int]) -> dict[str, int]:
    return dict(Counter(records[i].lang for i in indices))


@torch.no_grad()
def collect_statistics(
    model: MedUniC,
    records: Sequence[Record],
    cache: ImageCache,
    tokenizer,
    cfg: MedUniCConfig,
    batches: int,
    device: torch.device = torch.device("cpu"),
) -> tuple[AlignmentState, dict[str, int]]:
    """A statistics-only pass (``align.round1 = stats``): the alignment sums of a few
    training-mode batches, with no update (BatchNorm running statistics are restored), and
    the distinct pairs behind them per language."""
    records, _ = prepare_images(records, cache, progress=False)
    stream = pair_stream(records, cache, tokenizer, cfg.train.batch_size, 1, cfg.model.text.max_length,
                         cfg.model.image, cfg.train.seed, cfg.data.num_workers, strong_view=cfg.loss.ssv_weight > 0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    aligner = Aligner(model, mode="local", include_image=cfg.align.image)
    drawn: set[int] = set()
    with aligner.attached():
        for i, batch in zip(range(batches), stream):
            forward_loss(model, batch, cfg, device, aligner=aligner)
            drawn.update(batch["index"].tolist())
    model.load_state_dict(saved)
    return aligner.collected, _by_language(records, drawn)
