"""What every dataset adapter shares: candidate rows, validation, the manifest it writes.

An adapter reads a dataset in the layout it is released in and yields one
:class:`Candidate` per image (or a :class:`Problem` for a source row it cannot use).
:func:`prepare` then validates every candidate the same way for all datasets (image file
present, report non-empty and not NaN unless the dataset has no reports, id unique),
writes ``OUT/manifest.jsonl`` in our manifest format (medunic_core.data.manifest) and
``OUT/problems.csv``, and returns the counts a person checks before training.

Labels are mapped onto our findings (medunic_core.constants.FINDINGS) by each adapter
with :func:`map_labels`; an uncertain or missing label is unknown (left out), never 0.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from medunic_core.constants import FINDINGS, SPLITS
from medunic_core.data.manifest import Record, write_manifest
from medunic_core.errors import ConfigError, SiteDataError


@dataclass(frozen=True)
class Candidate:
    """One image/report pair as read from the source; validated by :func:`prepare`."""

    id: str
    image_path: str  # absolute
    report: str  # "" for datasets without reports (labels only)
    lang: str
    split: str
    site: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    source: str = ""  # where it came from (file and row), for problem messages


@dataclass(frozen=True)
class Problem:
    """A source row that is not used, named so that a person can find it."""

    id: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source} (id={self.id or '?'}): {self.message}"


@dataclass
class Prepared:
    dataset: str
    manifest: Path
    records: int
    counts: dict[str, Counter]  # "split", "lang", "finding" -> counts
    problems: list[Problem]

    def summary(self, shown: int = 20) -> str:
        lines = [f"{self.dataset}: {self.records} rows written to {self.manifest}"]
        for kind, counter in self.counts.items():
            lines.append(f"  by {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
        kinds = Counter(p.message.split(":")[0] for p in self.problems)
        lines.append(f"  problems: {len(self.problems)}" + (" (" + ", ".join(f"{k}: {v}" for k, v in
                                                                      sorted(kinds.items())) + ")" if kinds else ""))
        lines += [f"    {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"    ... and {len(self.problems) - shown} more in {self.manifest.parent / 'problems.csv'}")
        return "\n".join(lines)


# The CheXpert labeler's columns (CheXpert, MIMIC-CXR) -> our findings. "Lung Lesion"
# (nodule or mass) is the closest class to a nodule.
CHEXPERT_LABELS = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Lung Lesion": "nodule",
    "Edema": "edema",
}

Row = Union[Candidate, Problem]
Adapter = Callable[..., Iterable[Row]]  # (root: Path, site: str, **options: str) -> rows


@dataclass(frozen=True)
class AdapterInfo:
    read: Adapter
    reports: bool  # False: labels only (zero-shot and probe evaluation); reports may be ""
    help: str


ADAPTERS: dict[str, AdapterInfo] = {}


def register(name: str, reports: bool = True) -> Callable[[Adapter], Adapter]:
    """Register an adapter under the name ``medunic prepare NAME`` uses; its docstring's
    first line is the help text, its keyword options are ``--opt KEY=VALUE``."""

    def wrap(fn: Adapter) -> Adapter:
        ADAPTERS[name] = AdapterInfo(fn, reports, (fn.__doc__ or name).strip().splitlines()[0])
        return fn

    return wrap


def is_missing(value: Any) -> bool:
    """True for None, NaN and blank strings (pandas-style "nan" included)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in ("", "nan", "none", "null")


def map_labels(source: Mapping[str, Any], mapping: Mapping[str, str],
               positive: Iterable[Any] = (1, "1", "1.0", 1.0), negative: Iterable[Any] = (0, "0", "0.0", 0.0)
               ) -> dict[str, int]:
    """Source label columns -> our findings: positive -> 1, negative -> 0, anything else
    (uncertain -1, blank, NaN) -> unknown (left out)."""
    pos, neg = set(positive), set(negative)
    out: dict[str, int] = {}
    for column, finding in mapping.items():
        value = source.get(column)
        if value in pos:
            out[finding] = 1
        elif value in neg:
            out[finding] = 0
    return out


ABSENT_CHOICES = ("unknown", "negative")


def map_tags(tags: Iterable[str], mapping: Mapping[str, str], normal: Iterable[str] = (),
             absent: str = "unknown") -> dict[str, int]:
    """Finding tags (PadChest labels, Open-i MeSH terms) -> our findings, case-insensitively.

    A mapped tag -> 1. A ``normal`` tag -> every finding not tagged is 0 (a tagged one stays
    1: the source contradicts itself, and the positive is the specific statement). A finding
    that is neither tagged nor ruled out by ``normal`` is unknown, unless ``absent="negative"``
    (for a source whose tags list everything that was seen), where it is 0.
    """
    if absent not in ABSENT_CHOICES:
        raise ConfigError(f"absent={absent!r} must be one of {ABSENT_CHOICES}")
    lowered = {k.lower(): v for k, v in mapping.items()}
    names = {t.strip().lower() for t in tags}
    out = {lowered[t]: 1 for t in names if t in lowered}
    if absent == "negative" or names & {n.lower() for n in normal}:
        out.update({f: 0 for f in FINDINGS if f not in out})
    return out


def parse_views(value: str) -> Optional[frozenset[str]]:
    """A ``views``/``projections`` option: comma-separated names (case-insensitive), or
    ``all`` (None: keep every view, also images whose view is not recorded)."""
    if value.strip().lower() == "all":
        return None
    views = frozenset(v.strip().upper() for v in value.split(",") if v.strip())
    if not views:
        raise ConfigError(f"views={value!r}: name at least one view (e.g. PA,AP) or 'all'")
    return views


_SPLIT_NAMES = {"training": "train", "valid": "val", "validate": "val", "validation": "val", "dev": "val",
                "testing": "test", **{s: s for s in SPLITS}}


def normalize_split(value: str) -> Optional[str]:
    """A source split name (train/validate/test, ...) -> ours, or None if it is not one."""
    return _SPLIT_NAMES.get(str(value).strip().lower())


def hash_split(key: str, val_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    """A split from a stable hash of ``key`` (use the patient id where there is one, so that
    a patient's images never straddle splits): the same on every machine and every run."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def split_rule(dataset: str, split: str = "hash", val_fraction: str = "0.1", test_fraction: str = "0.2"
               ) -> Callable[[str], str]:
    """The ``--opt split=hash|train|val|test`` (and fraction) options of an adapter as a
    function key -> split, checked once up front so that a typo fails before any row."""
    if split in SPLITS:
        return lambda key: split
    if split != "hash":
        raise ConfigError(f"{dataset}: --opt split={split!r}; use hash or one of {list(SPLITS)}")
    try:
        val, test = float(val_fraction), float(test_fraction)
    except ValueError:
        raise ConfigError(f"{dataset}: val_fraction={val_fraction!r} / test_fraction={test_fraction!r} "
                          "must be numbers") from None
    if not (0.0 <= val and 0.0 <= test and val + test < 1.0):
        raise ConfigError(f"{dataset}: val_fraction + test_fraction must be in [0, 1) to leave a train split")
    return lambda key: hash_split(key, val, test)


def prepare(dataset: str, rows: Iterable[Row], out: str | Path, require_report: bool = True) -> Prepared:
    """Validate candidate rows, write ``OUT/manifest.jsonl`` and ``OUT/problems.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        where = row.source or row.id
        if row.id in seen:
            problems.append(Problem(row.id, where, "duplicate id: a row with this id came earlier"))
            continue
        if not Path(row.image_path).is_file():
            problems.append(Problem(row.id, where, f"missing file: {row.image_path}"))
            continue
        if require_report and is_missing(row.report):
            problems.append(Problem(row.id, where, "empty report: empty or NaN"))
            continue
        seen.add(row.id)
        records.append(Record(row.id, str(Path(row.image_path).resolve()), "" if is_missing(row.report) else
                              row.report.strip(), row.lang, row.split, row.site, dict(row.labels)))
    if not records:
        shown = "\n  ".join(str(p) for p in problems[:10])
        raise SiteDataError(f"{dataset}: no usable rows" + (f"; problems:\n  {shown}" if problems else
                                                             " (is --root the dataset's top folder?)"))
    manifest = write_manifest(records, out / "manifest.jsonl")
    with (out / "problems.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "source", "problem"])
        writer.writerows([p.id, p.source, p.message] for p in problems)
    counts = {
        "split": Counter(r.split for r in records),
        "lang": Counter(r.lang for r in records),
        "finding": Counter(k for r in records for k, v in r.labels.items() if v == 1),
    }
    return Prepared(dataset, manifest, len(records), counts, problems)


def locate(root: Path, name: str) -> Path:
    """File ``name`` under ``root`` (or absolute); a table is also found with its ``.gz``
    suffix added or removed, because datasets are shipped and unpacked both ways."""
    path = root / name
    alternative = path.with_name(path.name[:-3] if path.name.endswith(".gz") else path.name + ".gz")
    for candidate in (path, alternative):
        if candidate.is_file():
            return candidate
    raise SiteDataError(f"{path} does not exist (nor {alternative.name}); is --root the dataset's top folder?")


def iter_csv(path: Path, required: Iterable[str]) -> Iterator[dict[str, str]]:
    """Rows of a CSV (or .csv.gz) as dicts, one at a time (tables of 100k+ rows); the file
    and its header are checked now, so that a wrong file fails before any row is read."""
    if not path.is_file():
        raise SiteDataError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    fh = opener(path, "rt", encoding="utf-8", newline="")  # type: ignore[operator]
    reader = csv.DictReader(fh)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        fh.close()
        raise SiteDataError(f"{path}: missing columns {missing}; found {reader.fieldnames}")

    def rows() -> Iterator[dict[str, str]]:
        with fh:
            yield from reader

    return rows()
