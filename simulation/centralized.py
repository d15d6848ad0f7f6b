"""Centralized baseline runs on synthetic bilingual data: ``medunic demo`` and ``medunic compare``.

Both follow the paper's order: the cross-lingual vocabulary and a short MLM warm-up of
the text encoder (skipped with ``mlm.steps=0`` or when ``model.text.pretrained`` is set),
then VLP, then evaluation. ``demo`` generates the synthetic EN+ES data (once), trains the
tiny preset and prints the evaluation table. ``compare`` trains the same data, text
initialisation, budget and seeds with CTR on and off and writes the community-bias and
retrieval metrics side by side.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from medunic_core.cli import add_config_args
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.data.synthetic.generator import generate
from medunic_core.errors import ConfigError
from medunic_core.evaluation.report import compare_table, format_eval_markdown, write_comparison
from medunic_core.evaluation.run import evaluate
from medunic_core.mlm import train_mlm
from medunic_core.train import train
from simulation.experiments import load_suite

log = logging.getLogger(__name__)



def ensure_synthetic_data(cfg: MedUniCConfig, progress: bool = True) -> Path:
    """Generate the synthetic manifest unless ``data.manifest`` already exists."""
    manifest = Path(cfg.data.manifest)
    if manifest.is_file():
        log.info("using existing data %s", manifest)
        return manifest
    written = generate(cfg.synth, manifest.parent, progress=progress)
    if written.resolve() != manifest.resolve():
        raise ConfigError(f"data.manifest={manifest}: the generator writes {written}; point data.manifest there")
    return written


def text_warmup(cfg: MedUniCConfig, progress: bool = True) -> list[str]:
    """Run the MLM warm-up once; the overrides that make VLP start from its encoder."""
    if cfg.mlm.steps <= 0 or cfg.model.text.pretrained:
        return []
    result = train_mlm(cfg, progress=progress)
    return [f"model.text.pretrained={result.text_encoder}", f"train.tokenizer={result.tokenizer}"]


def train_and_evaluate(cfg: MedUniCConfig, progress: bool = True) -> dict[str, Any]:
    """One training run followed by its evaluation (results dict of medunic_core.evaluation)."""
    result = train(cfg, progress=progress)
    return evaluate(result.out_dir, progress=progress)


def run_demo(preset: str, overrides: Sequence[str], progress: bool = True) -> dict[str, Any]:
    cfg = load_config(preset, list(overrides))
    ensure_synthetic_data(cfg, progress)
    cfg = load_config(preset, [*overrides, *text_warmup(cfg, progress)])
    results = train_and_evaluate(cfg, progress)
    print(format_eval_markdown(results))
    print(f"\nreport: {Path(cfg.train.out_dir) / 'eval' / 'eval.md'}")
    return results


def run_compare(
    preset: str,
    overrides: Sequence[str],
    seeds: Sequence[int],
    out_dir: Optional[str] = None,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Every variant of configs/experiments/compare.yaml x seed on the same data and budget."""
    base = load_config(preset, list(overrides))
    ensure_synthetic_data(base, progress)
    root = Path(out_dir or Path(base.train.out_dir).parent / "compare")
    overrides = [*overrides, f"mlm.out_dir={root / 'mlm'}"]
    overrides += text_warmup(load_config(preset, overrides), progress)
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in load_suite("compare").variants:
        for seed in seeds:
            cfg = load_config(preset, [*overrides, *variant.overrides, f"train.seed={seed}",
                                       f"train.out_dir={root / variant.name / f'seed{seed}'}"])
            log.info("variant %s, seed %d", variant.name, seed)
            runs.setdefault(variant.name, []).append(train_and_evaluate(cfg, progress))
    write_comparison(runs, root)
    print(compare_table(runs))
    print(f"\ncomparison: {root / 'compare.md'}")
    return runs


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="synthetic EN+ES data -> (MLM warm-up) -> train -> evaluation table")
    add_config_args(parser, preset="tiny")
    parser.set_defaults(func=_demo)


def register_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="CTR on vs off, same data/budget/seeds, side by side")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder of the comparison (default: runs/compare)")
    parser.set_defaults(func=_compare)


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.preset, args.overrides, not args.no_progress)
    return 0


def _compare(args: argparse.Namespace) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    run_compare(args.preset, args.overrides, seeds, args.out, not args.no_progress)
    return 0
