"""Training-step throughput (pairs/s) of a preset, full Med-UniC against cheaper baselines.

Runs forward + backward + AdamW step on random tensors of the preset's shapes, so only
the model and losses are measured (see data_pipeline.py for the input side). Rows:
- full: L_CVL + L_SSV + L_CTR (two text passes), the training objective;
- no SSV: L_CVL + L_CTR, the strong view not encoded (what ``loss.ssv_weight=0`` runs);
- no CTR: L_CVL + L_SSV, one text pass (the cost of CTR is the difference);
- CLIP only: L_CVL on the weak view, the baseline every VLP method pays.

    python benchmarks/train_throughput.py [--preset tiny] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from medunic_core.config import load_config
from medunic_core.losses import infonce, medunic_loss
from medunic_core.models import create_model
from medunic_core.optim import build_optimizer

VOCAB = 2000


def measure(preset: str, overrides: list[str], variant: str, steps: int, warmup: int) -> tuple[float, float]:
    cfg = load_config(preset, [*overrides, f"loss.ctr={variant in ('full', 'no SSV')}",
                               f"loss.ssv_weight={0 if variant == 'no SSV' else 1}"])
    torch.manual_seed(0)
    model = create_model(cfg.model, VOCAB).train()
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    n, s, length = cfg.train.batch_size, cfg.model.image.size, cfg.model.text.max_length
    images = torch.randn(n, 3, s, s)
    ids = torch.randint(5, VOCAB, (n, length))
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if variant == "CLIP only":
            v = model.encode_image(images)
            t = model.encode_text(ids, mask)
            loss = infonce(v, t, cfg.loss.temperature)
        else:
            strong = images.flip(-1) if cfg.loss.ssv_weight else None
            out = model(images, strong, ids, mask, ctr=cfg.loss.ctr)
            loss = medunic_loss(out, cfg.loss)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    per_step = sum(times) / len(times)
    return n / per_step, per_step * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.preset, args.overrides)
    print(f"preset {args.preset}: batch {cfg.train.batch_size}, image {cfg.model.image.size}px, "
          f"text {cfg.model.text.max_length} tokens, torch threads {torch.get_num_threads()}")
    variants = ("full", "no SSV", "no CTR", "CLIP only")
    rows = [(v, *measure(args.preset, args.overrides, v, args.steps, args.warmup)) for v in variants]
    base = rows[0][1]
    print("\n| variant | pairs/s | ms/step | vs full |\n|---|---:|---:|---:|")
    for name, pps, ms in rows:
        print(f"| {name} | {pps:.1f} | {ms:.0f} | {pps / base:.2f}x |")


if __name__ == "__main__":
    main()
