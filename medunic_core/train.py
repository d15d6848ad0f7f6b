"""Centralized Med-UniC training: ``medunic train``.

Mixed-language batches from one pooled manifest, AdamW with warm-up + cosine, gradient
accumulation and clipping, fp16 autocast on CUDA, a sharded sampler under torchrun, and
checkpoints that resume exactly (model, optimizer, scheduler, scaler, RNG, position).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medunic_core.align import Aligner
from medunic_core.checkpoint import (
    atomic_save,
    check_finite,
    load_checkpoint,
    load_state_dict_strict,
    rng_state,
    set_rng_state,
)
from medunic_core.cli import add_config_args
from medunic_core.config import MedUniCConfig, load_config, save_config, to_dict
from medunic_core.constants import CHECKPOINT_FILE, DATA_PROBLEMS_FILE, METRICS_FILE
from medunic_core.data.dataset import EpochSampler, PairDataset, TextCollator, prepare_images
from medunic_core.data.manifest import read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.data.transforms import TwoViewTransform
from medunic_core.errors import ConfigError
from medunic_core.losses import check_finite_loss, medunic_loss
from medunic_core.models import MedUniC, create_model, trainable_parameters
from medunic_core.vocab import build_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run leaves behind."""

    out_dir: Path
    step: int
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per logged step


def resolve_device(name: str) -> torch.device:
    """``train.device``: auto picks CUDA when there is one; asking for a missing one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}, but torch sees no CUDA device here; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps, but this machine has no MPS device; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    """lr multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norm scales get no weight decay."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def prepare_tokenizer(cfg: MedUniCConfig, reports: list[tuple[str, str]], out_dir: Path):
    """The run's tokenizer: given by ``train.tokenizer``, reused from out_dir, or built."""
    if cfg.train.tokenizer:
        return load_tokenizer(cfg.train.tokenizer)
    folder = out_dir / "tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder)
    return build_tokenizer(cfg.vocab, reports, folder)


def forward_loss(
    net: torch.nn.Module,
    batch: dict,
    cfg: MedUniCConfig,
    device: torch.device,
    autocast=nullcontext,
    aligner: Optional[Aligner] = None,
) -> dict[str, torch.Tensor]:
    """One forward pass over a collated batch and the named loss parts.

    With an aligner (federated sites), its BatchNorms are told the batch's communities and
    L_TF uses the mixed cross-correlation when the aligner provides one.
    """
    if aligner is not None:
        aligner.begin_batch(batch["lang"])
    with autocast():
        out = net(
            batch["image"].to(device),
            batch["image_strong"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            ctr=cfg.loss.ctr,
        )
    out = {k: v.float() for k, v in out.items()}
    if aligner is not None and cfg.loss.ctr:
        c = aligner.mixed_cross(out["ctr_a"], out["ctr_b"])
        if c is not None:
            out["ctr_c"] = c
    return medunic_loss(out, cfg.loss)


class _Distributed:
    """Rank and world size under torchrun (a single process otherwise)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: MedUniCConfig, progress: bool = True, stop_at_step: Optional[int] = None) -> TrainResult:
    """Train Med-UniC on the manifest's train split; resume from out_dir when asked.

    ``stop_at_step`` ends the run early after a checkpoint, as a preemption would, without
    changing the schedule (which always spans the configured number of steps).
    """
    world = _Distributed()
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world.enabled:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    seed_everything(cfg.train.seed)

    records = read_manifest(cfg.data.manifest, cfg.data.langs, split="train")
    langs = sorted({r.lang for r in records})
    log.info("train split: %d pairs, languages %s", len(records), langs)
    reports = [(r.report, r.lang) for r in records]
    if world.is_main:  # rank 0 builds the tokenizer, the others load what it wrote
        tokenizer = prepare_tokenizer(cfg, reports, out_dir)
    world.barrier()
    if not world.is_main:
        tokenizer = prepare_tokenizer(cfg, reports, out_dir)
    cache = ImageCache(cfg.data.cache_dir, cfg.model.image.cache_size)
    records, _ = prepare_images(records, cache, cfg.data.max_bad_fraction, progress=progress and world.is_main,
                                problems_file=out_dir / DATA_PROBLEMS_FILE if world.is_main else None)

    img = cfg.model.image
    dataset = PairDataset(records, cache, TwoViewTransform(img.size, img.mean, img.std), cfg.train.seed)
    sampler = EpochSampler(len(dataset), cfg.train.seed, world.rank, world.world_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=TextCollator(tokenizer, cfg.model.text.max_length),
        drop_last=True,  # BatchNorm heads and CTR need full batches
        generator=torch.Generator().manual_seed(cfg.train.seed),  # never touch the global RNG
        persistent_workers=False,
    )
    batches_per_epoch = len(sampler) // cfg.train.batch_size
    steps_per_epoch = batches_per_epoch // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(records)} training pairs give no optimizer step with batch_size="
            f"{cfg.train.batch_size} x accum_steps={cfg.train.accum_steps} on {world.world_size} process(es)"
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch

    model = create_model(cfg.model, len(tokenizer), tokenizer.pad_token_id).to(device).train()
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    )
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt_path = out_dir / CHECKPOINT_FILE
    resuming = cfg.train.resume and ckpt_path.is_file()
    if resuming:
        state = load_checkpoint(ckpt_path)
        load_state_dict_strict(model, state["model"], source=str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, batch_in_epoch)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world.enabled
        else model
    )

    if world.is_main:
        save_config(cfg, out_dir / "config.yaml")
    wandb_run = start_wandb(cfg, out_dir) if world.is_main and cfg.logging.wandb else None
    metrics_file = (out_dir / METRICS_FILE).open("a" if resuming else "w") if world.is_main else None
    history: list[dict[str, Any]] = []
    bar = tqdm(total=total_steps, initial=step, desc="training", disable=not (progress and world.is_main))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
    sums: dict[str, float] = {}
    t0, pairs = time.perf_counter(), 0
    batches_used = steps_per_epoch * cfg.train.accum_steps  # whole accumulation groups only
    while step < total_steps:
        sampler.set_epoch(epoch, start=batch_in_epoch * cfg.train.batch_size)
        for batch in loader:
            parts = forward_loss(net, batch, cfg, device, autocast)
            if not use_amp:  # under AMP the grad scaler skips steps with inf/NaN gradients itself
                check_finite_loss(parts, f"{out_dir}: step {step + 1}")
            scaler.scale(parts["loss"] / cfg.train.accum_steps).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.train.accum_steps
            batch_in_epoch += 1
            pairs += len(batch["report"]) * world.world_size
            if batch_in_epoch % cfg.train.accum_steps:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t0
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "pairs_per_s": pairs / elapsed if elapsed > 0 else 0.0,
                    **sums,
                }
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if wandb_run:
                    wandb_run.log(row, step=step)
                t0, pairs = time.perf_counter(), 0
            sums = {}
            epoch_done = batch_in_epoch >= batches_used
            if epoch_done:
                epoch, batch_in_epoch = epoch + 1, 0
            stopping = stop_at_step is not None and step >= stop_at_step
            if world.is_main and (step % cfg.train.ckpt_every == 0 or step == total_steps or epoch_done or stopping):
                _save(ckpt_path, model, optimizer, scheduler, scaler, step, epoch, batch_in_epoch)
            if stopping:
                total_steps = step
            if epoch_done or step >= total_steps:
                break
    bar.close()
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()
    world.close()
    return TrainResult(out_dir, step, ckpt_path, history)


def _save(path: Path, model: MedUniC, optimizer, scheduler, scaler, step: int, epoch: int, batch_in_epoch: int) -> None:
    check_finite(model.state_dict(), f"{path} at step {step}")
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
        },
        path,
    )


def start_wandb(cfg: MedUniCConfig, out_dir: Path):
    """wandb offline by default: runs are synced later with ``wandb sync`` if wanted."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb_project,
        mode=cfg.logging.wandb_mode,
        dir=str(out_dir),
        config=to_dict(cfg),
        reinit="finish_previous",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="centralized Med-UniC training on a manifest")
    add_config_args(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, config_file=args.config)
    result = train(cfg, progress=not args.no_progress)
    last = result.history[-1] if result.history else {}
    print(f"trained to step {result.step}; checkpoint {result.checkpoint}; last loss {last.get('loss', float('nan')):.4f}")
    return 0
