"""``medunic experiment``: centralized vs federated Med-UniC, same data, budget and seeds.

The data, the vocabulary and the MLM warm-up are made once, federated (a ``stage=text``
simulation). For every seed it trains, from that shared MLM-initialised text encoder:

- centralized, CTR on and off (``train.max_steps`` = the federation's total site steps, so
  both see the same number of pairs);
- federated (a real Flower simulation each), ``align.train_norm`` local and mixed, CTR on
  and off;

and evaluates every trained model with ``align.eval_norm`` global and community (an
evaluation-time choice: the same weights, two normalisations). It writes one table with
mean and spread over seeds, one row per variant (``compare.md`` / ``.json``). Running the
same command again reuses every trained model and evaluation already in the folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from medunic_core.cli import add_config_args
from medunic_core.config import load_config
from medunic_core.evaluation.report import write_comparison
from medunic_core.evaluation.run import evaluate
from medunic_core.train import train
from medunic_core.federation.runconfig import PAIRS_PER_SITE, parse_site_specs, parse_sites, synthetic_data_dir
from simulation.federated import simulate

log = logging.getLogger(__name__)

CTR = {"ctr": "loss.ctr=true", "no-ctr": "loss.ctr=false"}
TRAIN_NORMS = ("local", "mixed")
EVAL_NORMS = ("global", "community")
HEADLINE = (  # DESIGN.md's order: retrieval first, then community bias, then zero-shot
    "retrieval/mean/R@1", "retrieval/mean/R@5", "retrieval/mean/chance@5",
    "bias/text/lang_mean_dist_over_spread", "bias/text/silhouette_lang",
    "zeroshot/en/macro_auc", "zeroshot/es/macro_auc",
)
DEFAULT_MLM_STEPS = 200  # DESIGN.md: experiments start from an MLM-initialised text encoder


def _evaluate_both(run_dir: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Both evaluation norms of one trained model; an evaluation already written is reused."""
    out = {}
    for norm in EVAL_NORMS:
        done = run_dir / f"eval-{norm}" / "eval.json"
        out[norm] = json.loads(done.read_text()) if done.is_file() else evaluate(
            run_dir, run_dir / f"eval-{norm}", [f"align.eval_norm={norm}", "eval.tsne=false"], progress=progress)
    return out


def run_experiment(
    preset: str,
    overrides: Sequence[str],
    seeds: Sequence[int],
    sites: str = "en-1:en,es-1:es",
    pairs_per_site: int = 0,
    out: str | Path = "runs/experiment",
    progress: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every variant for every seed; returns results by row name."""
    root = Path(out).resolve()
    warmup = [] if any(o.startswith("mlm.steps=") for o in overrides) else [f"mlm.steps={DEFAULT_MLM_STEPS}"]
    # data, vocabulary and MLM warm-up once, federated (stage=text), shared by every variant
    prepared = simulate(preset, [*warmup, *overrides, f"fed.out_dir={root / 'shared'}"], sites, pairs_per_site,
                        progress, stage="text")
    manifest = (synthetic_data_dir(parse_site_specs(sites, pairs_per_site or PAIRS_PER_SITE)) / "manifest.jsonl")
    shared = [*warmup, *overrides, f"data.manifest={manifest.resolve()}",
              f"train.tokenizer={prepared / 'vocab' / 'tokenizer'}"]
    if load_config(preset, shared).mlm.steps > 0:
        shared.append(f"model.text.pretrained={prepared / 'mlm' / 'text_encoder'}")
    cfg = load_config(preset, shared)
    n_sites = len(parse_sites(sites))
    steps = cfg.fed.rounds * cfg.fed.local_steps * n_sites
    print(f"experiment: {len(seeds)} seeds; budget {steps} steps of {cfg.train.batch_size} pairs per run "
          f"({cfg.fed.rounds} rounds x {cfg.fed.local_steps} steps x {n_sites} sites)", flush=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for ctr_name, ctr in CTR.items():
            run = root / f"central-{ctr_name}" / f"seed{seed}"
            ccfg = load_config(preset, [*shared, ctr, f"train.seed={seed}", f"train.out_dir={run}",
                                        f"train.max_steps={steps}"])
            train(ccfg, progress=progress)  # resumes (or returns at once) when the run exists
            for norm, res in _evaluate_both(run, progress).items():
                rows.setdefault(f"centralized / {ctr_name} / eval {norm}", []).append(res)
            for train_norm in TRAIN_NORMS:
                fed_dir = root / f"fed-{train_norm}-{ctr_name}" / f"seed{seed}"
                if not (fed_dir / "model" / "checkpoint.pt").is_file():  # an interrupted experiment resumes
                    simulate(preset, [*shared, ctr, f"train.seed={seed}", f"align.train_norm={train_norm}",
                                      f"fed.out_dir={fed_dir}", "eval.tsne=false"],
                             sites, pairs_per_site, progress, stage="vlp")
                for norm, res in _evaluate_both(fed_dir / "model", progress).items():
                    rows.setdefault(f"federated {train_norm} / {ctr_name} / eval {norm}", []).append(res)
            write_comparison(rows, root, by_run=True, preamble=_preamble(cfg, seeds, sites, steps),
                             columns=HEADLINE)
    print((root / "compare.md").read_text())
    return rows


def _preamble(cfg, seeds: Sequence[int], site_list: str, steps: int) -> str:
    return (
        f"Sites {site_list}; seeds {', '.join(map(str, seeds))}; every run {steps} optimizer steps of "
        f"{cfg.train.batch_size} pairs (federated: {cfg.fed.rounds} rounds x {cfg.fed.local_steps} local "
        f"steps per site); text encoder MLM-initialised ({cfg.mlm.steps} steps) for all. Cells: mean ± std "
        "over seeds. `eval global|community` = align.eval_norm at evaluation (same weights)."
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="centralized vs federated variants x seeds, one table")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--sites", default="en-1:en,es-1:es", help="sites name:lang[:pairs[:profile]] "
                                                                   "(default: %(default)s)")
    parser.add_argument("--pairs-per-site", type=int, default=0, help="synthetic pairs per site (default: 400)")
    parser.add_argument("--out", default="runs/experiment", help="experiment folder (default: %(default)s)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_experiment(args.preset, args.overrides, seeds, args.sites, args.pairs_per_site, args.out,
                   not args.no_progress)
    return 0
