"""Centralized Med-UniC training: ``medunic train``.

Mixed-language batches from one pooled manifest, AdamW with warm-up + cosine, gradient
accumulation and clipping, fp16 autocast on CUDA, a sharded sampler under torchrun, and
checkpoints that resume exactly (model, optimizer, scheduler, scaler, RNG, position).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

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
from medunic_core.config import MedUniCConfig, check_resumable, load_config, save_config, to_dict
from medunic_core.constants import CHECKPOINT_FILE, DATA_PROBLEMS_FILE, METRICS_FILE
from medunic_core.data.dataset import pair_stream, prepare_images
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError
from medunic_core.loop import StepRecord, train_local
from medunic_core.losses import medunic_loss
from medunic_core.models import MedUniC, create_model
from medunic_core.optim import Stepper, build_optimizer, cosine_with_warmup, seed_everything
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
            batch["image_strong"].to(device) if "image_strong" in batch else None,
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


def train_records(cfg: MedUniCConfig, require_report: bool = True) -> list[Record]:
    """The train split of ``data.manifest`` in ``data.langs``, of ``train.sites`` when set."""
    records = read_manifest(cfg.data.manifest, cfg.data.langs, split="train", require_report=require_report)
    if cfg.train.sites:
        records = [r for r in records if r.site in set(cfg.train.sites)]
        if not records:
            raise ConfigError(f"train.sites={list(cfg.train.sites)}: no train rows of these sites in {cfg.data.manifest}")
    return records


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

    records = train_records(cfg)
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

    tr = cfg.train
    stream = pair_stream(records, cache, tokenizer, tr.batch_size, tr.accum_steps, cfg.model.text.max_length,
                         cfg.model.image, tr.seed, cfg.data.num_workers, world.rank, world.world_size,
                         strong_view=cfg.loss.ssv_weight > 0)
    steps_per_epoch = stream.per_epoch // tr.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(records)} training pairs give no optimizer step with batch_size="
            f"{tr.batch_size} x accum_steps={tr.accum_steps} on {world.world_size} process(es)"
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch

    model = create_model(cfg.model, len(tokenizer), tokenizer.pad_token_id).to(device).train()
    stepper = vlp_stepper(model, cfg, total_steps, device)
    step = 0
    ckpt_path = out_dir / CHECKPOINT_FILE
    resuming = cfg.train.resume and ckpt_path.is_file()
    if resuming:
        state = load_checkpoint(ckpt_path)
        check_resumable(state.get("config") or {}, cfg, ckpt_path, "train.resume")
        load_state_dict_strict(model, state["model"], source=str(ckpt_path))
        stepper.load_state_dict(state)
        set_rng_state(state["rng"])
        step, stream.epoch, stream.batch = state["step"], state["epoch"], state["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, step, stream.epoch, stream.batch)
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
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if stepper.scaler.is_enabled() else nullcontext
    clock = {"t0": time.perf_counter(), "pairs": 0}

    def loss_fn(batch: dict) -> tuple[dict[str, torch.Tensor], int]:
        return forward_loss(net, batch, cfg, device, autocast), len(batch["report"])

    def on_step(record: StepRecord) -> bool:
        """Log every ``log_every`` steps; checkpoint every ``ckpt_every``, at an epoch's end,
        at the end and at ``stop_at_step``."""
        clock["pairs"] += record.examples * world.world_size
        if record.step % cfg.train.log_every == 0 or record.step == total_steps:
            elapsed = time.perf_counter() - clock["t0"]
            row = {"step": record.step, "epoch": stream.epoch - stream.epoch_ended, "lr": record.lr,
                   "grad_norm": record.grad_norm, "pairs_per_s": clock["pairs"] / elapsed if elapsed > 0 else 0.0,
                   **record.parts}
            history.append(row)
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if wandb_run:
                wandb_run.log(row, step=record.step)
            clock["t0"], clock["pairs"] = time.perf_counter(), 0
        stopping = stop_at_step is not None and record.step >= stop_at_step
        if world.is_main and (record.step % cfg.train.ckpt_every == 0 or record.step == total_steps
                              or stream.epoch_ended or stopping):
            _save(ckpt_path, model, stepper, record.step, stream.epoch, stream.batch, cfg)
        return stopping

    result = train_local(stream, loss_fn, stepper, total_steps - step, first_step=step, on_step=on_step,
                         where=str(out_dir), progress=progress and world.is_main)
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()
    world.close()
    return TrainResult(out_dir, step + result.steps, ckpt_path, history)


def vlp_stepper(model: torch.nn.Module, cfg: MedUniCConfig, total_steps: int, device: torch.device,
                first_step: int = 0) -> Stepper:
    """The VLP optimizer: AdamW, warm-up + cosine over ``total_steps``, accumulation,
    clipping and, on CUDA with ``train.amp``, fp16 grad scaling."""
    tr = cfg.train
    return Stepper(model, build_optimizer(model, tr.lr, tr.weight_decay),
                   cosine_with_warmup(tr.warmup_steps, total_steps, tr.min_lr_ratio), tr.grad_clip, tr.accum_steps,
                   first_step, amp=tr.amp and device.type == "cuda")


def _save(path: Path, model: MedUniC, stepper: Stepper, step: int, epoch: int, batch_in_epoch: int,
          cfg: MedUniCConfig) -> None:
    check_finite(model.state_dict(), f"{path} at step {step}")
    atomic_save(
        {
            "model": model.state_dict(),
            **stepper.state_dict(),
            "rng": rng_state(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "config": to_dict(cfg),  # a resume continues this run only (check_resumable)
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
