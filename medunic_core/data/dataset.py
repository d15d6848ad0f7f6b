"""Image/report pairs for training and evaluation, with a resumable, sharded sampler.

Randomness of the views comes from a generator seeded by (seed, epoch, index), not from a
worker's RNG, so that a resumed run sees exactly the views it would have seen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from medunic_core.data.manifest import Record, RowProblem
from medunic_core.data.preprocess import ImageCache
from medunic_core.data.transforms import TwoViewTransform, eval_transform
from medunic_core.errors import MedunicError, SiteDataError

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, epoch, sample)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x9E3779B9) % (2**63 - 1)


def prepare_images(
    records: Sequence[Record],
    cache: ImageCache,
    max_bad_fraction: float = 0.0,
    progress: bool = True,
    problems_file: Optional[Path] = None,
) -> tuple[list[Record], list[RowProblem]]:
    """Decode and cache every image once, so bad files are found before training starts.

    Unreadable images are listed by row, id and file (also in ``problems_file``, as JSON,
    when given) and left out; more than ``max_bad_fraction`` of them stops the run instead
    of training on what is left.
    """
    good: list[Record] = []
    problems: list[RowProblem] = []
    for row, rec in enumerate(tqdm(records, desc="caching images", disable=not progress), start=1):
        try:
            cache.get(rec.image_path)
        except MedunicError as exc:
            problems.append(RowProblem(row, rec.id, str(exc)))
            continue
        good.append(rec)
    if problems_file is not None:
        problems_file.parent.mkdir(parents=True, exist_ok=True)
        problems_file.write_text(json.dumps([str(p) for p in problems], indent=1))
    if problems:
        for p in problems[:20]:
            log.warning("skipping %s", p)
        if len(problems) / max(len(records), 1) > max_bad_fraction:
            shown = "\n  ".join(str(p) for p in problems[:20])
            where = f" (all listed in {problems_file})" if problems_file is not None else ""
            raise SiteDataError(f"{len(problems)} of {len(records)} images are unreadable, more than "
                                f"data.max_bad_fraction={max_bad_fraction:g}{where}:\n  {shown}")
        log.warning("%d of %d images are unreadable and left out%s", len(problems), len(records),
                    f" (listed in {problems_file})" if problems_file is not None else "")
    return good, problems


class PairDataset(Dataset):
    """Training pairs: item ``(epoch, index)`` -> the per-sample part of the two image
    views (:meth:`TwoViewTransform.draw`) and the report text; :class:`PairCollator`
    finishes the views of a whole batch at once."""

    def __init__(self, records: Sequence[Record], cache: ImageCache, transform: TwoViewTransform, seed: int) -> None:
        self.records = list(records)
        self.cache = cache
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rec = self.records[index]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        drawn = self.transform.draw(self.cache.get(rec.image_path), generator)
        return {**drawn, "report": rec.report, "lang": rec.lang, "index": index}


class EvalDataset(Dataset):
    """Evaluation pairs: one deterministic view per image, plus the report and labels."""

    def __init__(self, records: Sequence[Record], cache: ImageCache, size: int, mean: float, std: float) -> None:
        self.records = list(records)
        self.cache = cache
        self.size, self.mean, self.std = size, mean, std

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = eval_transform(self.cache.get(rec.image_path), self.size, self.mean, self.std)
        return {"image": image, "report": rec.report, "lang": rec.lang, "index": index}


class EpochSampler(Sampler):
    """Shuffles with (seed, epoch), shards across ranks, and can start mid-epoch.

    Every rank draws the same permutation and takes every ``world_size``-th index, so under
    torchrun each process reads a different part of the data (the public Med-UniC code let
    every GPU read the same samples). ``start`` skips the samples this rank already consumed
    in the epoch, for exact resume.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if num_samples < world_size:
            raise SiteDataError(f"{num_samples} samples cannot be sharded across {world_size} processes")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = num_samples // world_size  # drop the tail so every rank has as many

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        shard = order[self.rank : self.per_rank * self.world_size : self.world_size]
        for index in shard[self.start :]:
            yield self.epoch, index


class EpochStream:
    """Batches of a loader over :class:`EpochSampler`, epoch after epoch: ``per_epoch``
    batches of each (whole accumulation groups), from a position ``(epoch, batch)`` that a
    checkpoint stores and a resume restores. After each batch, ``epoch_ended`` says whether
    it was the epoch's last."""

    def __init__(self, sampler: EpochSampler, loader: Any, batch_size: int, per_epoch: int, epoch: int = 0) -> None:
        self.sampler, self.loader, self.batch_size, self.per_epoch = sampler, loader, batch_size, per_epoch
        self.epoch, self.batch, self.epoch_ended = epoch, 0, False

    def __iter__(self) -> Iterator[Any]:
        while True:
            self.sampler.set_epoch(self.epoch, start=self.batch * self.batch_size)
            for batch in self.loader:
                self.batch += 1
                self.epoch_ended = self.batch >= self.per_epoch
                if self.epoch_ended:
                    self.epoch, self.batch = self.epoch + 1, 0
                yield batch
                if self.epoch_ended:
                    break


@dataclass
class PairCollator:
    """Finishes a batch of :class:`PairDataset` items: both image views in one batched
    call of ``views.finish``, the reports padded and tokenized in one call of the fast
    tokenizer (no tokenizer: images only, for the supervised reference)."""

    views: TwoViewTransform
    tokenizer: Optional[Callable]
    max_length: int

    def __call__(self, items: list[dict]) -> dict:
        batch = {key: [it[key] for it in items] for key in items[0]}
        drawn = {key: torch.stack(batch.pop(key)) for key in ("image", "image_strong", "jitter") if key in batch}
        batch["image"], strong = self.views.finish(drawn)
        if strong is not None:
            batch["image_strong"] = strong
        batch["index"] = torch.tensor(batch["index"])
        if self.tokenizer is None:
            return batch
        tokens = self.tokenizer(
            batch["report"], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch["input_ids"] = tokens["input_ids"]
        batch["attention_mask"] = tokens["attention_mask"]
        return batch


def pair_stream(records: Sequence[Record], cache: ImageCache, tokenizer: Optional[Callable], batch_size: int,
                accum_steps: int, max_length: int, image: Any, seed: int, num_workers: int = 0, rank: int = 0,
                world_size: int = 1, *, strong_view: bool = True) -> EpochStream:
    """The training batches of every trainer (centralized, a site's round): two views per
    image and the tokenized reports, full batches only (BatchNorm heads and CTR need them),
    whole accumulation groups per epoch, order and views from ``seed`` alone. ``image`` is
    the model's image config (size, mean, std). Without ``strong_view`` the batches hold
    the weak view only (``image_strong`` is absent): for runs without L_SSV and for image-only
    training. The stream starts at epoch 0, batch 0; a resume sets ``epoch`` and ``batch``."""
    views = TwoViewTransform(image.size, image.mean, image.std, strong=strong_view)
    dataset = PairDataset(records, cache, views, seed)
    sampler = EpochSampler(len(dataset), seed, rank, world_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=PairCollator(views, tokenizer, max_length), drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # never touch the global RNG
        persistent_workers=False,
    )
    per_epoch = len(sampler) // batch_size // accum_steps * accum_steps
    return EpochStream(sampler, loader, batch_size, per_epoch)
