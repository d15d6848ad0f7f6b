"""The supervised reference (``medunic supervised``): the preset's image encoder trained on
the findings' labels, with the data, views, optimizer and budget of a VLP run.

Zero-shot AUC and the linear probes are read against it. A linear probe near this figure
says the image features already hold what the labels can teach at this resolution and
budget; a zero-shot figure far below the probe is a gap in the alignment of the two towers,
not in the images (README, "Status"). It trains with the one loop (medunic_core.loop) and
a per-finding logistic loss on the weak view; nothing of it enters Med-UniC training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medunic_core.cli import add_config_args
from medunic_core.config import MedUniCConfig, load_config, save_config
from medunic_core.constants import FINDINGS
from medunic_core.data.dataset import pair_stream, prepare_images
from medunic_core.data.manifest import Record
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError
from medunic_core.evaluation.run import heldout_records, image_batches
from medunic_core.evaluation.linear_probe import macro_auc
from medunic_core.evaluation.zeroshot import label_matrix
from medunic_core.loop import train_local
from medunic_core.models.encoders import ImageEncoder
from medunic_core.optim import seed_everything
from medunic_core.train import resolve_device, train_records, vlp_stepper

RESULT_FILE = "supervised.json"


@torch.no_grad()
def _scores(model: nn.Module, records: list[Record], cache: ImageCache, cfg: MedUniCConfig,
            device: torch.device) -> np.ndarray:
    model.eval()
    return torch.cat([model(images.to(device)).float().cpu() for images in image_batches(records, cache, cfg)]).numpy()


def train_supervised(cfg: MedUniCConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the image encoder and a linear layer on the train split's labels for
    ``train.max_steps`` steps; returns (and writes to ``out_dir``) the held-out macro AUC."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    tr = cfg.train
    cache = ImageCache(cfg.data.cache_dir, cfg.model.image.cache_size)
    records, _ = prepare_images(train_records(cfg, require_report=False), cache, cfg.data.max_bad_fraction, progress=progress)
    labels = torch.tensor(label_matrix(records), dtype=torch.float32)
    stream = pair_stream(records, cache, None, tr.batch_size, tr.accum_steps, 0, cfg.model.image, tr.seed,
                         cfg.data.num_workers, strong_view=False)
    if stream.per_epoch == 0:
        raise ConfigError(f"{len(records)} training images give no step with batch_size={tr.batch_size}")
    steps = tr.max_steps if tr.max_steps > 0 else tr.epochs * stream.per_epoch // tr.accum_steps
    encoder = ImageEncoder(cfg.model.image)
    model = nn.Sequential(encoder, nn.Linear(encoder.out_dim, len(FINDINGS))).to(device).train()
    stepper = vlp_stepper(model, cfg, steps, device)

    def loss_fn(batch: dict) -> tuple[dict[str, torch.Tensor], int]:
        y = labels[batch["index"]].to(device)
        known = torch.isfinite(y) & (y >= 0)
        logits = model(batch["image"].to(device))
        return {"loss": F.binary_cross_entropy_with_logits(logits[known], y[known])}, len(batch["index"])

    result = train_local(stream, loss_fn, stepper, steps, where="supervised", progress=progress)
    test, _ = prepare_images(heldout_records(cfg), cache, 1.0, progress=False)
    if not test:
        raise ConfigError(f"no readable '{cfg.eval.split}' rows to evaluate on")
    auc, per_finding = macro_auc(_scores(model, test, cache, cfg, device), label_matrix(test))
    summary = {"macro_auc": auc, "per_finding": per_finding, "steps": result.steps, "n_train": len(records),
               "n_test": len(test), "image": {"name": cfg.model.image.name, "size": cfg.model.image.size},
               "seconds": result.metrics["seconds"], "train_loss": result.metrics.get("loss")}
    save_config(cfg, out / "config.yaml")
    (out / RESULT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("supervised", help="the supervised reference: the image encoder trained on the "
                                                      "labels, held-out macro AUC")
    add_config_args(parser)
    parser.add_argument("--out", default="runs/supervised", help="result folder (default: %(default)s)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, config_file=args.config)
    res = train_supervised(cfg, args.out, progress=not args.no_progress)
    print(f"\nsupervised {res['image']['name']} at {res['image']['size']} px, {res['steps']} steps of "
          f"{cfg.train.batch_size} on {res['n_train']} images; held-out ({res['n_test']} images) AUC:\n")
    print("| finding | AUC |\n|---|---:|")
    for finding, auc in res["per_finding"].items():
        print(f"| {finding} | {auc:.3f} |")
    print(f"| **macro** | **{res['macro_auc']:.3f}** |" if res["macro_auc"] is not None else "| macro | n/a |")
    print(f"\n{Path(args.out) / RESULT_FILE}")
    return 0
