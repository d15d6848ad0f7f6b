"""``medunic synth``: generate the synthetic bilingual federation and summarise it."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from medunic_core.cli import add_config_args
from medunic_core.config import load_config
from medunic_core.constants import FINDINGS, SPLITS
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.synthetic.generator import default_workers, generate, generate_eval_set
from medunic_core.federation.runconfig import parse_site_specs, synth_sites_override


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` sub-command (entry point ``medunic.commands``)."""
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic chest films with English/Spanish reports",
        description="Write <out>/images/<site>/*.png|.dcm and <out>/manifest.jsonl from the synth.* config.",
    )
    add_config_args(p)
    p.add_argument("--out", default=None, help="output folder (default: synth.out)")
    p.add_argument(
        "--sites",
        default=None,
        metavar="NAME:LANG[:N[:PROFILE]],...",
        help="replace synth.sites, e.g. en-1:en:100:default,es-1:es:100:portable",
    )
    p.add_argument("--workers", type=int, default=default_workers(), help="processes (default: %(default)s)")
    p.add_argument("--eval-set", type=int, default=0, metavar="N",
                   help="write instead a fixed bilingual evaluation set of N films, each with an EN and an ES "
                        "report of the same findings, acquired like the sites (use it as eval.manifest)")
    p.set_defaults(func=run)


def format_summary(records: list[Record]) -> str:
    """Two text tables: records per site/language/split, and finding prevalence per site."""
    sites = sorted({(r.site, r.lang) for r in records})
    counts = Counter((r.site, r.lang, r.split) for r in records)  # a bilingual set has two rows per film
    lines = [f"{'site':<12}{'lang':<6}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}"]
    for site, lang in sites:
        row = [counts[(site, lang, s)] for s in SPLITS]
        lines.append(f"{site:<12}{lang:<6}" + "".join(f"{c:>7}" for c in row) + f"{sum(row):>7}")
    lines.append("")
    names = list(dict.fromkeys(s for s, _ in sites))
    lines.append(f"{'prevalence':<18}" + "".join(f"{n:>10}" for n in names) + f"{'all':>10}")
    groups = [[r for r in records if r.site == n] for n in names] + [records]
    for finding in (*FINDINGS, "(normal)"):
        cells = []
        for group in groups:
            hits = sum(not r.finding_set if finding == "(normal)" else r.labels.get(finding, 0) for r in group)
            cells.append(f"{100.0 * hits / max(1, len(group)):>9.1f}%")
        lines.append(f"{finding:<18}" + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.sites:
        overrides.append(synth_sites_override(parse_site_specs(args.sites)))
    cfg = load_config(args.preset, overrides, config_file=args.config)
    if args.eval_set:
        profiles = list(dict.fromkeys(site.profile for site in cfg.synth.sites))
        manifest = generate_eval_set(cfg.synth, args.eval_set, Path(args.out or f"{cfg.synth.out}-eval{args.eval_set}"),
                                     profiles, progress=not args.no_progress, workers=args.workers)
    else:
        manifest = generate(cfg.synth, out=args.out, progress=not args.no_progress, workers=args.workers)
    records = read_manifest(manifest)
    print(f"wrote {len(records)} records to {manifest}")
    print(format_summary(records))
    return 0
