"""``medunic experiment``: variants x seeds on the same data and budget, one table.

The variants are a suite in ``configs/experiments/<suite>.yaml`` (``--suite``, default
``default``: centralized vs federated ``align.train_norm`` local and mixed, CTR on and off),
each a name, a kind (``centralized`` or ``federated``) and medunic overrides. The data, the
vocabulary and the suite's MLM warm-up are made once, federated (a ``stage=text``
simulation); for every seed each variant trains from that shared text encoder:
centralized with ``train.max_steps`` = the federation's total site steps (so both see the
same number of pairs), federated as a real Flower simulation (``stage=vlp``). Every trained
model is evaluated with each of the suite's ``eval_norms`` (an evaluation-time choice: the
same weights). It writes one table with mean and spread over seeds, one row per variant
and eval norm (``compare.md`` / ``.json``). Running the same command again reuses every
trained model and evaluation already in the folder. A run's records (``seconds.json`` and
each ``eval-<norm>/eval.json``) are all its tables need: a run whose records are written is
not touched, so records copied from another machine (or from ``results/``) resume an
experiment without its weights.

A seed is the unit of pairing, so all of a seed's runs must start from the same inputs
(text encoder, vocabulary, manifests), and another machine may remake the shared text
encoder with other bits. Every run records the hashes of its inputs (``inputs.json``); a
recorded run from other inputs than today's is reused only as part of a complete seed
from one set of inputs evaluated on today's evaluation set, otherwise it is set aside
(``seed<n>.other-inputs``) and trained again. A run trained from today's inputs whose
evaluations were made on another evaluation set is evaluated again from its weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medunic_core.cli import add_config_args
from medunic_core.config import CONFIG_DIR, load_config
from medunic_core.errors import ConfigError
from medunic_core.data.manifest import deal, read_manifest, write_manifest
from medunic_core.data.synthetic.generator import MANIFEST_NAME, default_workers, generate_eval_set
from medunic_core.evaluation.paired import Comparison, paired_comparisons, paired_table
from medunic_core.evaluation.report import write_comparison
from medunic_core.evaluation.run import evaluate
from medunic_core.train import train
from medunic_core.vocab import vocab_sha256
from medunic_core.federation.runconfig import (
    DEFAULT_SITES, PAIRS_PER_SITE, parse_site_specs, parse_sites, synthetic_data_dir)
from simulation.federated import cores, simulate

log = logging.getLogger(__name__)

SUITES_DIR = CONFIG_DIR / "experiments"
KINDS = ("centralized", "federated")
PARTITIONS = ("", "dealt")
HEADLINE = (  # DESIGN.md's order: retrieval first, then community bias, then zero-shot
    "retrieval/mean/R@1", "retrieval/mean/R@5", "retrieval/mean/chance@5",
    "bias/text/lang_mean_dist_over_spread", "bias/text/silhouette_lang",
    "zeroshot/en/macro_auc", "zeroshot/es/macro_auc",
)


@dataclass
class Variant:
    name: str = MISSING
    kind: str = MISSING  # centralized | federated
    overrides: list[str] = field(default_factory=list)
    sites: str = ""  # the sites it federates (or whose budget a centralized run gets); "" = the experiment's
    # which pairs its sites hold: "" each row's own site; "dealt": the experiment's pairs dealt over this
    # variant's sites in turn (medunic_core.data.manifest.deal), the same pairs split another way
    partition: str = ""


@dataclass
class Suite:
    """A suite of variants (``configs/experiments/NAME.yaml``)."""

    description: str = ""
    sites: str = ""  # the experiment's sites (name:lang[:pairs[:profile]]); "" = DEFAULT_SITES; --sites overrides
    mlm_steps: int = 0  # the shared MLM warm-up; 0 keeps the preset's mlm.steps
    eval_set: int = 0  # cases of a fixed bilingual evaluation set made once for all runs; 0: the data's test split
    eval_norms: list[str] = field(default_factory=lambda: ["global", "community"])
    columns: list[str] = field(default_factory=lambda: list(HEADLINE))  # result paths of the table
    overrides: list[str] = field(default_factory=list)  # for every variant, before its own
    variants: list[Variant] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)  # paired over seeds, rows "<variant> / eval <norm>"
    compare_on: list[str] = field(default_factory=list)  # metrics of a comparison without its own; [] = columns


def load_suite(name: str) -> Suite:
    """A suite by name (configs/experiments) or path, checked against :class:`Suite`."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise ConfigError(f"no experiment suite {path}; known suites: {known}")
    try:
        suite = OmegaConf.merge(OmegaConf.structured(Suite), OmegaConf.load(path))
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {' '.join(str(exc).split())[:200]}") from None
    bad = [v.name for v in suite.variants if v.kind not in KINDS]
    if bad or not suite.variants:
        raise ConfigError(f"{path}: every variant needs kind one of {KINDS} (not: {bad}), and a suite needs variants")
    bad = [v.name for v in suite.variants if v.partition not in PARTITIONS
           or (v.partition and (v.kind != "federated" or not v.sites))]
    if bad:
        raise ConfigError(f"{path}: variants {bad}: partition is one of {PARTITIONS}, and 'dealt' is for a federated "
                          "variant with its own sites")
    for spec in filter(None, (suite.sites, *(v.sites for v in suite.variants))):
        try:
            parse_site_specs(spec)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    rows = {f"{v.name} / eval {norm}" for v in suite.variants for norm in suite.eval_norms}
    unknown = [r for c in suite.comparisons for r in (*c.a, *c.b) if r not in rows]
    if unknown:  # found now, not after hours of training
        raise ConfigError(f"{path}: comparisons name rows {unknown}; rows are '<variant> / eval <norm>': {sorted(rows)}")
    for c in suite.comparisons:
        compared = set(c.metrics or suite.compare_on or suite.columns)
        bad = {m: v for m, v in c.margins.items() if m not in compared or not v > 0}
        if bad:
            raise ConfigError(f"{path}: comparison '{c.name}' has margins {bad}; a margin is > 0 and for a metric it "
                              f"compares: {sorted(compared)}")
    return suite  # type: ignore[return-value]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _evaluate(run_dir: Path, norms: Sequence[str], shared: Sequence[str], progress: bool) -> dict[str, dict[str, Any]]:
    """Each evaluation norm of one trained model on the experiment's held-out set (``shared``:
    its manifest and languages, whatever the run trained on); one already written is reused."""
    out = {}
    for norm in norms:
        done = run_dir / f"eval-{norm}" / "eval.json"
        out[norm] = json.loads(done.read_text()) if done.is_file() else evaluate(
            run_dir, run_dir / f"eval-{norm}", [*shared, f"align.eval_norm={norm}", "eval.tsne=false"],
            progress=progress)
    return out


INPUTS = "inputs.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_inputs(folder: Path, inputs: dict[str, str]) -> None:
    (folder / INPUTS).write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def _recorded_inputs(run: Path) -> Optional[dict[str, str]]:
    """The inputs a started run (records or weights present) trained from; None when it has
    none written (recorded before inputs were)."""
    path = run / INPUTS
    return json.loads(path.read_text()) if path.is_file() else None


def started_runs(runs: Sequence[Path]) -> dict[Path, Optional[dict[str, str]]]:
    """The runs that hold records or weights (of a finished run, or a checkpoint of an
    interrupted one, a federation's ``server_checkpoint.pt`` included) -> their inputs."""
    return {run: _recorded_inputs(run) for run in runs
            if (run / "seconds.json").is_file() or any(run.rglob("*checkpoint.pt"))}


def stale_runs(started: dict[Path, Optional[dict[str, str]]], inputs: dict[str, str], variants: int) -> list[Path]:
    """The started runs of one seed (run -> its recorded inputs) that cannot be paired with
    what this experiment trains now from ``inputs``: none when the seed is complete (all
    ``variants`` runs) from one known set of inputs evaluated on this experiment's set, else
    every run from other or unknown inputs."""
    known = [json.dumps(v, sort_keys=True) for v in started.values() if v is not None]
    same_set = all(v.get("eval_manifest") == inputs.get("eval_manifest") for v in started.values() if v is not None)
    if len(started) == variants and len(known) == variants and len(set(known)) == 1 and same_set:
        return []
    return [run for run, recorded in started.items() if recorded != inputs]


def _aside_name(path: Path, label: str) -> Path:
    """``<path>.<label>``, numbered from 2 when that is taken: what was set aside before stays."""
    aside, n = path.with_name(f"{path.name}.{label}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{label}-{n}")
    return aside


def _set_aside(run: Path, inputs: dict[str, str]) -> None:
    recorded = _recorded_inputs(run) or {}
    changed = [k for k in sorted(set(recorded) | set(inputs)) if recorded.get(k) != inputs.get(k)]
    aside = _aside_name(run, "other-inputs")
    log.warning("%s started from other inputs than this experiment's (%s): it cannot be paired with the seed's "
                "new runs, so it is moved to %s and trained again", run, ", ".join(
                    f"{k} {recorded.get(k, 'unknown')[:8]} here {inputs.get(k, 'none')[:8]}" for k in changed),
                aside.name)
    run.rename(aside)


def _weights(variant: Variant, run: Path) -> Path:
    """Where a run keeps its final weights and evaluations: a federation exports them to ``model/``."""
    return run if variant.kind == "centralized" else run / "model"


def evaluated_elsewhere(model: Path, recorded: Optional[dict[str, str]], inputs: dict[str, str]) -> bool:
    """A run trained from this experiment's inputs, with its weights, whose evaluations were
    made on another evaluation set (``eval_manifest``, none: the sites' own test split): it
    is evaluated again, not trained again, and not reused with another set's figures."""
    def trained_from(found: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in found.items() if k != "eval_manifest"}

    return (recorded is not None and recorded.get("eval_manifest") != inputs.get("eval_manifest")
            and trained_from(recorded) == trained_from(inputs) and (model / "checkpoint.pt").is_file())


def _evaluate_again(run: Path, model: Path, recorded: dict[str, str], inputs: dict[str, str]) -> None:
    """Set the run's evaluations aside (``eval-<norm>.other-eval-set``) and record today's
    inputs (``recorded``: the run's own), so that the seed loop evaluates its weights on this
    experiment's set."""
    old = recorded.get("eval_manifest", "none")
    for records in sorted(p for p in model.glob("eval-*") if p.is_dir() and "." not in p.name):
        records.rename(_aside_name(records, "other-eval-set"))
    _write_inputs(run, inputs)
    log.warning("%s was evaluated on another evaluation set (eval_manifest %s here %s): its weights are kept and "
                "evaluated again", run, old[:8], inputs.get("eval_manifest", "none")[:8])


def _timed(run: Path, work: Callable[[], Any], trained: bool) -> float:
    """Seconds ``work`` took, kept in ``run/seconds.json`` (a reused run keeps its own).
    ``trained``: the run's evaluations or its final weights are there, so a run with its
    seconds needs no ``work`` (weights moved from another folder need not resume there)."""
    record = run / "seconds.json"
    if record.is_file():
        if not trained:
            work()  # neither records nor weights left: trained again
        return float(json.loads(record.read_text())["seconds"])
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps({"seconds": seconds}))
    return seconds


def run_experiment(
    preset: str,
    overrides: Sequence[str],
    seeds: Sequence[int],
    sites: Optional[str] = None,
    pairs_per_site: int = 0,
    out: str | Path = "runs/experiment",
    progress: bool = False,
    suite_name: str = "default",
    eval_set: Optional[int] = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every variant of the suite for every seed; returns results by row name."""
    suite = load_suite(suite_name)
    sites = sites or suite.sites or DEFAULT_SITES
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_provenance(root / "run.json", seeds)
    warmup = [f"mlm.steps={suite.mlm_steps}"] if suite.mlm_steps and not any(
        o.startswith("mlm.steps=") for o in overrides) else []
    # data, vocabulary and MLM warm-up once, federated (stage=text), shared by every variant
    prepared = simulate(preset, [*warmup, *overrides, f"fed.out_dir={root / 'shared'}"], sites, pairs_per_site,
                        progress, stage="text")
    manifest = (synthetic_data_dir(parse_site_specs(sites, pairs_per_site or PAIRS_PER_SITE)) / "manifest.jsonl")
    shared = [*warmup, *overrides, f"data.manifest={manifest.resolve()}",
              f"train.tokenizer={prepared / 'vocab' / 'tokenizer'}"]
    if load_config(preset, shared).mlm.steps > 0:
        shared.append(f"model.text.pretrained={prepared / 'mlm' / 'text_encoder'}")
    cfg = load_config(preset, shared)
    inputs = {"vocab": vocab_sha256(prepared / "vocab" / "tokenizer"), "train_manifest": file_sha256(manifest)}
    if cfg.mlm.steps > 0:
        inputs["text_encoder"] = file_sha256(prepared / "mlm" / "text_encoder" / "model.safetensors")
    steps = cfg.fed.rounds * cfg.fed.local_steps * len(parse_sites(sites))
    print(f"experiment '{suite_name}': {len(suite.variants)} variants x {len(seeds)} seeds; the default budget {steps} "
          f"steps of {cfg.train.batch_size} pairs per run ({cfg.fed.rounds} rounds x {cfg.fed.local_steps} steps x "
          f"{len(parse_sites(sites))} sites)", flush=True)
    evaluation = [f"data.manifest={manifest.resolve()}", f"data.langs=[{','.join(cfg.data.langs)}]"]
    cases = suite.eval_set if eval_set is None else eval_set
    if cases:
        eval_manifest = bilingual_eval_set(cfg, sites, pairs_per_site, cases, progress)
        evaluation.append(f"eval.manifest={eval_manifest}")
        inputs["eval_manifest"] = file_sha256(eval_manifest)
    _write_inputs(root, inputs)
    dealt = {v.name: [f"data.manifest={_dealt(manifest, v.sites, root / 'shared')}"] for v in suite.variants
             if v.partition}  # once: the same for every seed
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        runs = [root / _slug(variant.name) / f"seed{seed}" for variant in suite.variants]
        for variant, run in zip(suite.variants, runs):
            model, recorded = _weights(variant, run), _recorded_inputs(run)
            if evaluated_elsewhere(model, recorded, inputs):
                _evaluate_again(run, model, recorded, inputs)
        for run in stale_runs(started_runs(runs), inputs, len(runs)):
            _set_aside(run, inputs)
        for variant, run in zip(suite.variants, runs):
            run.mkdir(parents=True, exist_ok=True)
            if not (run / INPUTS).is_file():
                _write_inputs(run, inputs)
            common = [*shared, *suite.overrides, *variant.overrides, f"train.seed={seed}"]
            members = variant.sites or sites
            vcfg = load_config(preset, common)
            budget = vcfg.fed.rounds * vcfg.fed.local_steps * len(parse_sites(members))
            model = _weights(variant, run)
            trained = (all((model / f"eval-{norm}" / "eval.json").is_file() for norm in suite.eval_norms)
                       or (model / "checkpoint.pt").is_file())  # with seconds.json: the final weights
            if variant.kind == "centralized":  # the federation's total site steps, in one run
                seconds = _timed(run, lambda: train(load_config(preset, [*common, f"train.out_dir={run}",
                                                                         f"train.max_steps={budget}"]),
                                                    progress=progress), trained)
            else:
                def federate() -> None:
                    if not (model / "checkpoint.pt").is_file():  # an interrupted experiment resumes
                        simulate(preset, [*common, *dealt.get(variant.name, []), f"fed.out_dir={run}",
                                          "eval.tsne=false"], members, pairs_per_site, progress, stage="vlp")
                seconds = _timed(run, federate, trained)
            for norm, res in _evaluate(model, suite.eval_norms, evaluation, progress).items():
                rows.setdefault(f"{variant.name} / eval {norm}", []).append({**res, "seconds": seconds})
            write_comparison(rows, root, by_run=True, preamble=_preamble(cfg, seeds, sites, steps),
                             columns=tuple(suite.columns))
    if suite.comparisons:
        write_paired(root, suite, seeds)
    print((root / "compare.md").read_text())
    return rows


def _dealt(manifest: Path, sites: str, folder: Path) -> Path:
    """The experiment's pairs dealt over ``sites`` (a variant's ``partition: dealt``), in a
    manifest of their own named by those sites; image paths stay the original files."""
    names = [name for name, _ in parse_sites(sites)]
    path = folder / f"manifest-dealt-{_slug('-'.join(names))}.jsonl"
    write_manifest(deal(read_manifest(manifest.resolve()), names), path)  # absolute image paths stay absolute
    return path.resolve()


def write_paired(root: Path, suite: Suite, seeds: Sequence[int]) -> Path:
    """The suite's paired comparisons from ``compare.json`` (values in seed order) ->
    ``paired.json``, and their table appended to ``compare.md``."""
    runs = json.loads((root / "compare.json").read_text())["runs"]
    try:
        rows = paired_comparisons(runs, suite.comparisons, suite.compare_on or suite.columns)
    except ValueError as exc:
        raise ConfigError(f"{root}: {exc}; correct the suite and run the command again (it reuses the trained "
                          "runs)") from None
    inputs = {}
    for seed in seeds:  # what each seed's runs started from (one set per seed: run_experiment sees to it)
        recorded = {json.dumps(_recorded_inputs(root / _slug(v.name) / f"seed{seed}"), sort_keys=True)
                    for v in suite.variants}
        if len(recorded) != 1:
            raise ConfigError(f"{root}: the runs of seed {seed} started from different inputs; rerun the experiment "
                              "command, which trains the runs that cannot be paired again")
        inputs[str(seed)] = json.loads(recorded.pop())
    path = root / "paired.json"
    path.write_text(json.dumps({"seeds": list(seeds), "level": 0.95, "inputs": inputs, "comparisons": rows},
                               indent=2, allow_nan=False) + "\n")
    with (root / "compare.md").open("a") as f:
        f.write("\n" + paired_table(rows, f"Paired over seeds {', '.join(map(str, seeds))}: A - B, 95% t-interval")
                + "\n")
    return path


def write_provenance(path: Path, seeds: Sequence[int]) -> Path:
    """What a committed result must say about itself: the command, the commit (``+dirty``
    with uncommitted changes), the machine and the seeds (results/ in the README)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    path.write_text(json.dumps({
        "command": " ".join(["medunic", *sys.argv[1:]]) if Path(sys.argv[0]).name == "medunic" else " ".join(sys.argv),
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "seeds": list(seeds),
        "machine": f"{platform.machine()}, {cores()} cores, {gpu}, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
    }, indent=1) + "\n")
    return path


def bilingual_eval_set(cfg, sites: str, pairs_per_site: int, cases: int, progress: bool) -> Path:
    """The experiment's fixed evaluation set (``medunic synth --eval-set``), made once per
    number of cases, acquisition profiles of the sites, image size and data seed, and reused
    by every run."""
    profiles = list(dict.fromkeys(s.profile for s in parse_site_specs(sites, pairs_per_site or PAIRS_PER_SITE)))
    folder = Path("data") / f"eval-{cases}-{'-'.join(profiles)}-{cfg.synth.image_size}px-seed{cfg.synth.seed}"
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        generate_eval_set(cfg.synth, cases, folder, profiles, progress=progress, workers=default_workers())
    return manifest.resolve()


def _preamble(cfg, seeds: Sequence[int], site_list: str, steps: int) -> str:
    return (
        f"Sites {site_list}; seeds {', '.join(map(str, seeds))}; a run's budget is its federation's total site "
        f"steps of {cfg.train.batch_size} pairs (default {steps}: {cfg.fed.rounds} rounds x {cfg.fed.local_steps} "
        f"local steps per site; a centralized run takes them in one run); text encoder "
        f"{'MLM-initialised (%d steps)' % cfg.mlm.steps if cfg.mlm.steps else 'from scratch'} for all. Cells: mean "
        "± std over seeds. `eval global|community` = align.eval_norm at evaluation (same weights)."
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="centralized vs federated variants x seeds, one table")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--suite", default="default", help="configs/experiments/NAME.yaml or a path "
                                                              "(default: %(default)s)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--sites", default=None, help="sites name:lang[:pairs[:profile]] (default: the suite's, "
                                                       f"else {DEFAULT_SITES})")
    parser.add_argument("--pairs-per-site", type=int, default=0, help="synthetic pairs per site (default: 400)")
    parser.add_argument("--out", default="runs/experiment", help="experiment folder (default: %(default)s)")
    parser.add_argument("--eval-set", type=int, default=None, metavar="N",
                        help="cases of the fixed bilingual evaluation set (default: the suite's eval_set; 0: the "
                             "sites' own test split)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_experiment(args.preset, args.overrides, seeds, args.sites, args.pairs_per_site, args.out,
                   not args.no_progress, args.suite, args.eval_set)
    return 0
