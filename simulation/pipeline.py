"""``medunic pipeline``: the whole federated method on one machine, one report.

vocab -> mlm -> vlp -> eval, each stage a real Flower run (server.app dispatches on the
run config's ``stage``) on one simulation SuperLink:

1. ``stage=vocab``: the sites' word counts (rare words stay at the site) -> the tokenizer;
2. ``stage=mlm``: federated masked-language post-training -> the text encoder;
3. the community bias of that encoder on the held-out reports ("after MLM only");
4. ``stage=vlp`` twice from the same encoder, federated-local and federated-mixed
   (``align.train_norm``), CTR on, each exported and evaluated;
5. ``<out>/report.md`` and ``bias.png``: community bias after MLM and after VLP, measured
   (the paper's Figure 1 shows it as a picture).

Data: ``--data public-text`` (real PadChest Spanish and Open-i English reports with
rendered films, medunic_core.data.public_text) or ``--data synthetic``.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from client.site import build_model
from medunic_core.cli import add_config_args
from medunic_core.config import load_config
from medunic_core.data.manifest import read_manifest
from medunic_core.data.public_text import build_public_text
from medunic_core.errors import MedunicError
from medunic_core.evaluation.bias import community_bias
from medunic_core.evaluation.run import Encoder
from medunic_core.train import resolve_device
from medunic_core.vocab import load_tokenizer
from simulation.centralized import ensure_synthetic_data
from simulation.federated import (
    APP_DIR, flower_env, flwr_run, simulation_superlink, site_overrides, write_run_config)

SITES = "en-1:en,es-1:es"
BIAS_KEYS = ("lang_mean_dist_over_spread", "silhouette_lang", "lang_id_probe_acc")


def prepare_data(data: str, preset: str, overrides: list[str], pairs_per_site: int, progress: bool) -> list[str]:
    """The data overrides (absolute paths) of the federation: public text or synthetic."""
    if data == "public-text":
        folder = Path(f"data/public-text-{pairs_per_site}")
        manifest = build_public_text(folder, pairs_per_site, progress=progress)
        return [f"data.manifest={manifest.resolve()}", f"data.cache_dir={(folder / 'cache').resolve()}"]
    synth, _ = site_overrides("en:1,es:1", pairs_per_site)
    cfg = load_config(preset, [*synth, *overrides])
    ensure_synthetic_data(cfg, progress)
    return [*synth, f"data.manifest={Path(cfg.data.manifest).resolve()}",
            f"data.cache_dir={Path(cfg.data.cache_dir).resolve()}"]


def encoder_bias(preset: str, overrides: list[str], tokenizer: Path) -> dict[str, Any]:
    """Community bias of the text encoder's [CLS] features on the held-out reports."""
    cfg = load_config(preset, overrides)
    tok = load_tokenizer(tokenizer)
    test = [r for r in read_manifest(cfg.data.manifest, cfg.data.langs) if r.split == cfg.eval.split]
    encoder = Encoder(build_model(cfg, tok), tok, cfg, resolve_device(cfg.train.device))
    features = encoder.texts([r.report for r in test])[1]
    return community_bias(features, [r.lang for r in test])


def pipeline(preset: str, overrides: Sequence[str], data: str = "public-text", pairs_per_site: int = 400,
             mlm_rounds: int = 3, variants: Sequence[str] = ("local", "mixed"), progress: bool = True,
             flwr_home: Optional[Path] = None) -> Path:
    """Run every stage; returns the pipeline folder (``fed.out_dir``, default runs/pipeline)."""
    overrides = list(overrides)
    if not any(o.startswith("fed.out_dir=") for o in overrides):
        overrides.append("fed.out_dir=runs/pipeline")
    out = Path(load_config(preset, overrides).fed.out_dir).resolve()
    common = [*overrides, *prepare_data(data, preset, overrides, pairs_per_site, progress)]
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or APP_DIR / ".flwr").resolve()
    tag = uuid.uuid4().hex
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"data": data, "pairs_per_site": pairs_per_site}
    with simulation_superlink(flwr_home, out / "superlink.log", tag) as connection:
        env = flower_env(flwr_home, tag)

        def stage(name: str, folder: Path, extra: list[str], tokenizer: str, done: Path) -> None:
            print(f"\n== stage {name} -> {folder}", flush=True)
            config = write_run_config(folder / "run_config.toml", name.split("-")[0], preset,
                                      [*common, f"fed.out_dir={folder}", *extra], SITES, tokenizer)
            rc = flwr_run(connection, config, SITES, folder / "flower.log", env, progress)
            if rc != 0 or not done.exists():
                raise MedunicError(f"stage {name} did not finish (flwr exit {rc}); see {folder / 'flower.log'}")

        tokenizer = out / "vocab" / "tokenizer"
        stage("vocab", out / "vocab", [], "", tokenizer / "vocab.sha256")
        results["vocab"] = json.loads((out / "vocab" / "vocab_stage.json").read_text())
        encoder = out / "mlm" / "text_encoder"
        stage("mlm", out / "mlm", [f"fed.rounds={mlm_rounds}"], str(tokenizer), encoder / "config.json")
        results["mlm"] = [json.loads(line)["train"] for line in (out / "mlm" / "rounds.jsonl").read_text().splitlines()]
        pretrained = [f"model.text.pretrained={encoder}"]
        results["after_mlm"] = encoder_bias(preset, [*common, *pretrained], tokenizer)
        for variant in variants:
            folder = out / f"vlp-{variant}"
            stage(f"vlp-{variant}", folder, [*pretrained, f"align.train_norm={variant}", "loss.ctr=true"],
                  str(tokenizer), folder / "model" / "eval" / "eval.json")
            results[f"vlp-{variant}"] = json.loads((folder / "model" / "eval" / "eval.json").read_text())
    (out / "pipeline.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_pipeline_report(out, results, variants)
    print(f"\nreport: {report}")
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def write_pipeline_report(out: Path, results: dict[str, Any], variants: Sequence[str]) -> Path:
    """``report.md`` and ``bias.png``: the stages' summaries and community bias per stage."""
    vocab = results["vocab"]
    lines = [f"# Federated pipeline ({results['data']}, {results['pairs_per_site']} pairs per site)", "",
             "## Vocabulary stage", "",
             f"{vocab['vocab_size']} tokens (sha256 {vocab['sha256'][:12]}...), from the word counts of "
             f"{', '.join(f'{s} ({r})' for s, r in vocab['sites'].items())}; words received per language: "
             f"{vocab['words_received']}.", "", "## MLM stage", "", "| round | mean MLM loss of the sites |", "|---|---|"]
    lines += [f"| {i} | {_fmt(r.get('train_mlm_loss'))} |" for i, r in enumerate(results["mlm"], start=1)]
    rows = [("after MLM only", "F_l [CLS]", results["after_mlm"], {})]
    for v in variants:
        res = results[f"vlp-{v}"]
        rows.append((f"VLP federated-{v}, CTR on", "F_l [CLS]", res["bias"]["encoder"], res))
        rows.append((f"VLP federated-{v}, CTR on", f"P_l ({res['meta']['eval_norm']} norm)", res["bias"]["text"], res))
    header = ["stage", "embedding", "mean dist / spread", "silhouette (lang)", "lang-ID acc", "R@1", "R@5",
              "zero-shot en", "zero-shot es"]
    lines += ["", "## Community bias, measured (lower = less language clustering)", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, emb, bias, res in rows:
        retrieval = (res.get("retrieval") or {}).get("mean", {})
        zs = res.get("zeroshot", {})
        lines.append("| " + " | ".join([name, emb, *(_fmt(bias.get(k)) for k in BIAS_KEYS),
                                        _fmt(retrieval.get("R@1")), _fmt(retrieval.get("R@5")),
                                        _fmt((zs.get("en") or {}).get("macro_auc")),
                                        _fmt((zs.get("es") or {}).get("macro_auc"))]) + " |")
    chance = next(((results[f"vlp-{v}"].get("retrieval") or {}).get("mean", {}) for v in variants), {})
    lines += ["", f"F_l [CLS]: the text encoder's features; P_l: the report embedding. Chance levels: language-ID "
                  f"probe {_fmt(results['after_mlm'].get('lang_id_chance'))}, EN<->ES retrieval R@1 "
                  f"{_fmt(chance.get('chance@1'))}, R@5 {_fmt(chance.get('chance@5'))}.", "",
              "![community bias](bias.png)", ""]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{n.replace('VLP federated-', 'VLP ').replace(', CTR on', '')}\n{e.split(' (')[0]}" for n, e, _, _ in rows]
    for ax, key, title in zip(axes, BIAS_KEYS[:2], ("distance between language means / spread", "silhouette by language")):
        ax.bar(range(len(rows)), [b.get(key) or 0.0 for _, _, b, _ in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bias.png", dpi=120)
    plt.close(fig)
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="vocab -> mlm -> vlp (local and mixed) -> eval as Flower runs")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--data", choices=("public-text", "synthetic"), default="public-text",
                        help="real PadChest/Open-i report text (needs torchxrayvision's data files) or synthetic")
    parser.add_argument("--pairs-per-site", type=int, default=400, help="pairs per site (default: %(default)s)")
    parser.add_argument("--mlm-rounds", type=int, default=3, help="rounds of the MLM stage (default: %(default)s)")
    parser.add_argument("--variants", default="local,mixed", help="VLP align.train_norm variants (default: %(default)s)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    pipeline(args.preset, args.overrides, args.data, args.pairs_per_site, args.mlm_rounds,
             [v for v in args.variants.split(",") if v], not args.no_progress)
    return 0
