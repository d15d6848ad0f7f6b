"""What a federated round costs on top of the local training it contains, at equal threads.

One run, three measurements on the same preset, model and batch:
- the plain loop of ``train_throughput.py`` (forward + backward + AdamW on random tensors of
  the preset's shapes) with the threads a simulated site gets;
- centralized ``medunic train`` on the site's data for the same steps (the same loop with
  the real data path: cache reads, views, tokenisation), its logged pairs/s;
- a real one-site Flower simulation (``medunic simulate``, synthetic site ``en-1``) of
  ``--rounds`` x ``--steps`` (by default the preset's round: 50 steps in ``make demo``):
  each site reports its loop's wall time and pairs/s (data loading included), the
  coordinator the wall time of each round's train exchange (message transfer, model
  (re)build, round state, the loop, the reply).

Targets (issue 12): in-round throughput >= 0.9 x the plain loop; a round's exchange <= 1.15 x
the local compute it contains.

    python benchmarks/federation_overhead.py [--preset tiny] [--rounds 3] [--steps N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from train_throughput import measure  # benchmarks/ is the script's folder

from medunic_core.config import load_config
from medunic_core.federation.runconfig import parse_site_specs, synthetic_data_dir
from medunic_core.train import train
from simulation.federated import simulate, threads_per_site

SITE = "en-1:en"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="local steps per round (default: the preset's fed.local_steps, the demo's round)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.steps = args.steps or load_config(args.preset, args.overrides).fed.local_steps

    threads = threads_per_site(1)
    torch.set_num_threads(threads)
    plain_pps, plain_ms = measure(args.preset, args.overrides, "full", steps=20, warmup=3)

    out = Path(args.out or tempfile.mkdtemp(prefix="medunic-overhead-")).resolve()
    overrides = [*args.overrides, f"fed.out_dir={out}", f"fed.rounds={args.rounds}", f"fed.local_steps={args.steps}",
                 "fed.eval_every=1000", "logging.wandb=false"]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    simulate(args.preset, overrides, sites=SITE, progress=False)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    manifest = synthetic_data_dir(parse_site_specs(SITE)) / "manifest.jsonl"
    central = train(load_config(args.preset, [
        *args.overrides, f"data.manifest={manifest.resolve()}", f"train.tokenizer={out / 'vocab' / 'tokenizer'}",
        "train.sites=[en-1]", f"train.max_steps={args.rounds * args.steps}", f"train.log_every={args.steps}",
        f"train.out_dir={out / 'centralized'}", "train.resume=false", "logging.wandb=false"]), progress=False)
    central_pps = statistics.median(row["pairs_per_s"] for row in central.history)

    print(f"\npreset {args.preset}, one site, {args.rounds} rounds x {args.steps} steps, {threads} torch threads "
          f"(plain loop and site alike); run folder {out}\n")
    print("| round | site pairs/s | vs plain loop | vs centralized | local loop s | train exchange s | exchange / local |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios, overheads = [], []
    for row in rows:
        pps, local, wall = row["train"]["train_pairs_per_s"], row["train"]["train_seconds"], row["train_exchange_seconds"]
        ratios.append(pps / plain_pps)
        overheads.append(wall / local)
        print(f"| {row['round']} | {pps:.1f} | {ratios[-1]:.2f} | {pps / central_pps:.2f} | {local:.1f} | {wall:.1f} | "
              f"{overheads[-1]:.2f} |")
    print(f"\nplain loop (random tensors): {plain_pps:.1f} pairs/s, {plain_ms:.0f} ms/step; centralized "
          f"`medunic train` on the site's data: {central_pps:.1f} pairs/s (median over windows of {args.steps} steps)")
    print(f"median in-round throughput / plain loop: {statistics.median(ratios):.2f} (target >= 0.90)")
    print(f"median round exchange / local compute:  {statistics.median(overheads):.2f} (target <= 1.15)")


if __name__ == "__main__":
    main()
