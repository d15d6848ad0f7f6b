"""``medunic client check``: validate a site's data before it joins a federation.

Every manifest row is checked: well-formed, image file present and decodable (PNG/JPG or
DICOM with pixel data), report non-empty and in its row's language (one the site declared), no image
used twice. The summary counts each kind of problem, lists the bad rows by id and file
name, and shows the split sizes; the command fails (exit 3) when more than
``--max-bad`` of the rows are bad or a split the federation needs is empty, so that a
site never joins with data it would silently train on.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from medunic_core.constants import SPLITS
from medunic_core.data.language import detect_language, site_language_arg, site_languages
from medunic_core.data.manifest import parse_manifest
from medunic_core.data.readers import read_image
from medunic_core.errors import ConfigError, MedunicError, SiteDataError

KINDS = ("malformed row", "missing file", "unreadable image", "empty report", "wrong language", "duplicate image")


@dataclass(frozen=True)
class Problem:
    kind: str
    row: int
    id: str
    file: str
    message: str

    def __str__(self) -> str:
        where = f" {Path(self.file).name}" if self.file else ""
        return f"[{self.kind}] row {self.row} (id={self.id or '?'}){where}: {self.message}"


@dataclass
class CheckReport:
    manifest: str
    language: str
    site: Optional[str]
    rows: int = 0
    good: int = 0
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c.get(k, 0) for k in KINDS}

    @property
    def bad_fraction(self) -> float:
        return len({p.row for p in self.problems}) / max(self.rows, 1)

    def summary(self) -> str:
        lines = [f"site check: {self.manifest} (language {self.language}" + (f", site {self.site})" if self.site else ")"),
                 f"  rows: {self.rows}, usable: {self.good}, bad: {len({p.row for p in self.problems})} "
                 f"({100 * self.bad_fraction:.1f}%)",
                 "  splits (usable rows): " + ", ".join(f"{s} {self.splits.get(s, 0)}" for s in SPLITS),
                 "  problems:"]
        lines += [f"    {kind:<17} {n}" for kind, n in self.counts.items()]
        if self.problems:
            lines.append("  bad rows:")
            lines += [f"    {p}" for p in self.problems]
        return "\n".join(lines)


def _kind_of_manifest_problem(message: str) -> str:
    return "empty report" if message.startswith("empty report") else "malformed row"


def check_site(
    manifest: str | Path, language: str, site: Optional[str] = None, progress: bool = True
) -> CheckReport:
    """Check every row of ``manifest`` (restricted to ``site`` when given)."""
    try:
        langs = site_languages(language)
    except ConfigError as exc:
        raise SiteDataError(f"--language: {exc}") from None
    records, manifest_problems = parse_manifest(manifest)
    report = CheckReport(str(manifest), language, site)
    report.problems += [Problem(_kind_of_manifest_problem(p.message), p.row, p.id, "", p.message)
                        for p in manifest_problems]
    # parse_manifest keeps each data row either as a record or as a problem, in order
    problem_rows = {p.row for p in manifest_problems}
    record_rows = [n for n in range(1, len(records) + len(manifest_problems) + 1) if n not in problem_rows]
    rows = list(zip(record_rows, records))
    if site:
        rows = [(i, r) for i, r in rows if r.site == site]
        if not rows:
            raise SiteDataError(f"{manifest} has no rows of site '{site}'")
    report.rows = len(rows) + len(manifest_problems)
    seen_images: dict[str, str] = {}
    for row, rec in tqdm(rows, desc="checking rows", disable=not progress):
        bad = []
        if rec.lang not in langs:
            bad.append(Problem("wrong language", row, rec.id, rec.image_path,
                               f"declared '{rec.lang}' in a '{language}' site"))
        else:
            detected = detect_language(rec.report)
            if detected is not None and detected != rec.lang:
                bad.append(Problem("wrong language", row, rec.id, rec.image_path,
                                   f"the report reads as '{detected}'"))
        key = str(Path(rec.image_path).resolve())
        if key in seen_images:
            bad.append(Problem("duplicate image", row, rec.id, rec.image_path, f"also used by id {seen_images[key]}"))
        seen_images.setdefault(key, rec.id)
        if not Path(rec.image_path).exists():
            bad.append(Problem("missing file", row, rec.id, rec.image_path, "image file does not exist"))
        else:
            try:
                read_image(rec.image_path)
            except MedunicError as exc:
                bad.append(Problem("unreadable image", row, rec.id, rec.image_path, str(exc).split(": ", 1)[-1]))
        report.problems += bad
        if not bad:
            report.good += 1
            report.splits[rec.split] = report.splits.get(rec.split, 0) + 1
    return report


def refusals(report: CheckReport, max_bad: float) -> list[str]:
    """Why a site with this report may not join (empty: it may)."""
    out = []
    if report.bad_fraction > max_bad:
        out.append(f"{100 * report.bad_fraction:.1f}% of the rows are bad (allowed: {100 * max_bad:.1f}%)")
    if not report.splits.get("train"):
        out.append("no usable training rows")
    return out


def run_check(args: argparse.Namespace) -> int:
    report = check_site(args.data, args.language, args.site, progress=not args.no_progress)
    print(report.summary())
    refused = refusals(report, args.max_bad)
    if refused:
        print("REFUSED: " + "; ".join(refused) + ". Fix or drop the rows listed above.")
        return SiteDataError.exit_code
    print("OK: this site can join a federation.")
    return 0


def add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("check", help="validate a site's manifest, images and reports")
    parser.add_argument("--data", required=True, help="the site's manifest (.jsonl or .csv)")
    parser.add_argument("--language", required=True, type=site_language_arg,
                        help="the site's language community (en, es, or en+es for a site whose reports come in both)")
    parser.add_argument("--site", default=None, help="only the rows of this site")
    parser.add_argument("--max-bad", type=float, default=0.05, help="largest share of bad rows to accept (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_check)
