"""What a federated round costs on top of the local training it contains, at equal threads.

One run, on the same preset, model and batch:
- the plain loop of ``train_throughput.py`` (forward + backward + AdamW on random tensors of
  the preset's shapes) with the threads a simulated site gets;
- ``--repeats`` real one-site Flower simulations (``medunic simulate``, synthetic site
  ``en-1``) of ``--rounds`` x ``--steps`` (by default the preset's round: 50 steps in ``make
  demo``): each site reports its loop's wall time and pairs/s (data loading included), the
  coordinator the wall time of each round's train exchange (message transfer, model
  (re)build, round state, the loop, the reply); the site's pairs/s also after its first
  ``WARMUP_STEPS`` steps (steady state, as the plain loop is timed), which splits the
  round's figure into a per-round start-up cost and the loop's own speed;
- centralized ``medunic train`` on the site's data for one simulation's steps (the same
  loop and data path), its logged pairs/s.

A shared VM's speed drifts by 10-20% within minutes, so the plain loop runs before and
after each of the others (P S P S ... P C P) and each is compared with the mean of the two
plain measurements around it. With two repeats or more, the in-round ratio gets a 95%
t-interval over the repeats and a verdict against the target.

Targets (issue 12): in-round throughput >= 0.9 x the plain loop; a round's exchange <= 1.15 x
the local compute it contains.

    python benchmarks/federation_overhead.py [--preset tiny] [--rounds 3] [--steps N] [--repeats 1]
        [--results DIR] [key=value ...]

``--results DIR`` also writes the tables (``overhead.md``), the figures (``overhead.json``) and
the command, commit and machine (``run.json``) there: how results/federation-overhead/ was made.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from train_throughput import measure  # benchmarks/ is the script's folder

from medunic_core.config import load_config
from medunic_core.evaluation.paired import paired_difference
from medunic_core.federation.runconfig import parse_site_specs, synthetic_data_dir
from medunic_core.loop import WARMUP_STEPS
from medunic_core.train import train
from simulation.experiments import write_provenance
from simulation.federated import simulate, threads_per_site

SITE = "en-1:en"


TARGET_RATIO = 0.9
TARGET_OVERHEAD = 1.15


def plain_loop(args: argparse.Namespace) -> float:
    return measure(args.preset, args.overrides, "full", steps=20, warmup=WARMUP_STEPS)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="local steps per round (default: the preset's fed.local_steps, the demo's round)")
    parser.add_argument("--repeats", type=int, default=1, help="simulations, each between two plain-loop runs")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--results", default=None, help="folder for the tables, figures and provenance")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.steps = args.steps or load_config(args.preset, args.overrides).fed.local_steps

    threads = threads_per_site(1)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="medunic-overhead-")).resolve()
    plain = [plain_loop(args)]
    simulations = []
    for repeat in range(1, args.repeats + 1):
        run = out / f"simulation-{repeat}"
        simulate(args.preset, [*args.overrides, f"fed.out_dir={run}", f"fed.rounds={args.rounds}",
                               f"fed.local_steps={args.steps}", "fed.eval_every=1000", "logging.wandb=false"],
                 sites=SITE, progress=False)
        simulations.append([json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()])
        plain.append(plain_loop(args))
    manifest = synthetic_data_dir(parse_site_specs(SITE)) / "manifest.jsonl"
    central = train(load_config(args.preset, [
        *args.overrides, f"data.manifest={manifest.resolve()}", f"train.tokenizer={out / 'simulation-1/vocab/tokenizer'}",
        "train.sites=[en-1]", f"train.max_steps={args.rounds * args.steps}", f"train.log_every={args.steps}",
        f"train.out_dir={out / 'centralized'}", "train.resume=false", "logging.wandb=false"]), progress=False)
    central_pps = statistics.median(row["pairs_per_s"] for row in central.history)
    plain.append(plain_loop(args))

    lines: list[str] = []

    def show(line: str = "") -> None:
        print(line)
        lines.append(line)

    show(f"\npreset {args.preset}, one site, {args.repeats} simulation(s) of {args.rounds} rounds x {args.steps} "
         f"steps, {threads} torch threads (plain loop and site alike); run folder {out}\n")
    show(f"| simulation | round | site pairs/s | after {WARMUP_STEPS} steps | plain loop around it | vs plain loop | "
         "after warm-up vs plain | local loop s | train exchange s | exchange / local |")
    show("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios, steady, overheads, per_repeat, steady_per_repeat = [], [], [], [], []
    for repeat, rows in enumerate(simulations, start=1):
        around = (plain[repeat - 1] + plain[repeat]) / 2
        for row in rows:
            pps, local = row["train"]["train_pairs_per_s"], row["train"]["train_seconds"]
            warm = row["train"]["train_steady_pairs_per_s"]
            wall = row["train_exchange_seconds"]
            ratios.append(pps / around)
            steady.append(warm / around)
            overheads.append(wall / local)
            show(f"| {repeat} | {row['round']} | {pps:.1f} | {warm:.1f} | {around:.1f} | {ratios[-1]:.2f} | "
                 f"{steady[-1]:.2f} | {local:.1f} | {wall:.1f} | {overheads[-1]:.2f} |")
        per_repeat.append(statistics.median(ratios[-len(rows):]))
        steady_per_repeat.append(statistics.median(steady[-len(rows):]))
    around = (plain[-2] + plain[-1]) / 2
    show(f"\nplain loop (random tensors, in run order): {', '.join(f'{p:.1f}' for p in plain)} pairs/s; "
         f"centralized `medunic train` on the site's data: {central_pps:.1f} pairs/s (median over windows of "
         f"{args.steps} steps), {central_pps / around:.2f} x the plain loop around it")
    show(f"median in-round throughput / plain loop: {statistics.median(ratios):.2f} (target >= {TARGET_RATIO}); "
         f"after {WARMUP_STEPS} steps: {statistics.median(steady):.2f}")
    show(f"median round exchange / local compute:  {statistics.median(overheads):.2f} (target <= {TARGET_OVERHEAD})")
    figures: dict[str, Any] = {
        "preset": args.preset, "rounds": args.rounds, "steps": args.steps, "threads": threads,
        "plain_pairs_per_s": plain, "centralized_pairs_per_s": central_pps,
        "in_round_vs_plain": ratios, "after_warmup_vs_plain": steady, "exchange_vs_local": overheads,
        "targets": {"in_round_vs_plain": TARGET_RATIO, "exchange_vs_local": TARGET_OVERHEAD}, "over_simulations": {}}
    if len(per_repeat) > 1:
        for what, values in (("the whole round", per_repeat), (f"after {WARMUP_STEPS} steps", steady_per_repeat)):
            d = paired_difference(values, [TARGET_RATIO] * len(values))
            verdict = {"better": "met", "worse": "not met", "not resolved": "not resolved"}[d["verdict"]]
            lo, hi = (TARGET_RATIO + c for c in d["ci"])
            figures["over_simulations"][what] = {"medians": values, "mean": TARGET_RATIO + d["mean"],
                                                 "ci95": [lo, hi], "verdict": verdict}
            show(f"in-round / plain loop, {what}, over {len(values)} simulations (median of each): "
                 f"{', '.join(f'{r:.2f}' for r in values)}; mean {TARGET_RATIO + d['mean']:.2f}, 95% t-interval "
                 f"[{lo:.2f}, {hi:.2f}]: target >= {TARGET_RATIO} {verdict}")
    if args.results:
        folder = Path(args.results)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "overhead.md").write_text("\n".join(lines).strip() + "\n")
        (folder / "overhead.json").write_text(json.dumps(figures, indent=1) + "\n")
        write_provenance(folder / "run.json", [])


if __name__ == "__main__":
    main()
