"""The one manifest format every dataset is turned into.

A manifest is a JSONL (or CSV) table with one row per image/report pair:
``id, image_path, report, lang, split, site, labels``. ``image_path`` is relative to the
manifest's folder (or absolute); ``labels`` maps a finding name to 1 (present) or 0
(absent); a finding that is not listed is unknown. In CSV, ``labels`` is a JSON object.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from medunic_core.constants import LANGUAGES, MANIFEST_FIELDS, SPLITS
from medunic_core.errors import SiteDataError

REQUIRED_FIELDS = ("id", "image_path", "report", "lang", "split")


@dataclass(frozen=True)
class Record:
    """One image/report pair. ``image_path`` is absolute once read through this module."""

    id: str
    image_path: str
    report: str
    lang: str
    split: str
    site: str = ""
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def finding_set(self) -> frozenset[str]:
        """Positive findings: the ground truth that makes two reports 'the same'."""
        return frozenset(k for k, v in self.labels.items() if v == 1)


@dataclass(frozen=True)
class RowProblem:
    """A manifest row that cannot be used, with the reason a person can act on."""

    row: int  # 1-based data row number (header excluded)
    id: str
    message: str

    def __str__(self) -> str:
        rid = self.id if len(self.id) <= 64 else f"<{len(self.id)} characters>"
        return f"row {self.row} (id={rid or '?'}): {self.message}"


def shown(value: object) -> str:
    """A cell value fit for a log line: short values as they are, anything longer only by its
    length. A shifted column can put report text anywhere, and reports must not reach logs."""
    text = str(value)
    return repr(text) if len(text) <= 12 and "\n" not in text else f"a value of {len(text)} characters"


def _parse_labels(value: object) -> dict[str, int]:
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"labels ({shown(value)}) are not a JSON object of finding -> 0/1") from None
    if not isinstance(value, dict):
        raise ValueError(f"labels must be a JSON object of finding -> 0/1, got a {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if v not in (0, 1):
            raise ValueError(f"label {shown(k)} must be 0 or 1, got {shown(v)}")
        out[str(k)] = int(v)
    return out


def _rows(path: Path) -> Iterable[dict]:
    """The table's rows as dicts; a JSONL line that cannot be used becomes ``{"__error__": why}``."""
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for i, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield {"__error__": f"line {i} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                        f"{exc.start + 1}); re-save the manifest as UTF-8"}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {"__error__": f"line {i} is not valid JSON: {exc.msg}"}
                    continue
                if not isinstance(row, dict):
                    yield {"__error__": f"line {i} is a JSON {type(row).__name__}, not an object of fields "
                                        f"{list(MANIFEST_FIELDS)}"}
                    continue
                yield row
    elif path.suffix == ".csv":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SiteDataError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); re-save the "
                                "table as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [f for f in REQUIRED_FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise SiteDataError(f"{path}: missing columns {missing}; need {list(MANIFEST_FIELDS)}")
        yield from reader
    else:
        raise SiteDataError(f"{path}: a manifest must be .jsonl or .csv")


def parse_manifest(
    path: str | Path, langs: Optional[Iterable[str]] = None, require_report: bool = True
) -> tuple[list[Record], list[RowProblem]]:
    """Read a manifest, keeping good rows and describing every bad one.

    Checks: required fields present, non-empty report, known language and split,
    unique ids, well-formed labels. Image files are not opened here (see ``client check``).
    ``require_report=False`` accepts label-only rows (CheXpert, RSNA, SIIM: zero-shot and
    probe evaluation only): an empty or NaN-ish report becomes "", all else is checked.
    """
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"manifest {path} does not exist")
    allowed_langs = set(langs or LANGUAGES)
    records: list[Record] = []
    problems: list[RowProblem] = []
    seen: set[str] = set()
    for row_no, row in enumerate(_rows(path), start=1):
        rid = str(row.get("id") or "")
        if "__error__" in row:
            problems.append(RowProblem(row_no, rid, row["__error__"]))
            continue
        missing = [f for f in REQUIRED_FIELDS if f != "report" and not str(row.get(f) or "").strip()]
        if missing:
            problems.append(RowProblem(row_no, rid, f"missing {', '.join(missing)}"))
            continue
        report = str(row.get("report") or "").strip()
        if report.lower() == "nan":  # pandas' empty cell; refused as before unless label-only
            report = ""
        if not report and require_report:
            problems.append(RowProblem(row_no, rid, "empty report; fix or drop the row"))
            continue
        lang, split = str(row["lang"]).strip(), str(row["split"]).strip()
        if lang not in allowed_langs:
            problems.append(RowProblem(row_no, rid, f"language {shown(lang)} not in {sorted(allowed_langs)}"))
            continue
        if split not in SPLITS:
            problems.append(RowProblem(row_no, rid, f"split {shown(split)} not in {list(SPLITS)}"))
            continue
        if rid in seen:
            problems.append(RowProblem(row_no, rid, "duplicate id"))
            continue
        try:
            labels = _parse_labels(row.get("labels"))
        except ValueError as exc:
            problems.append(RowProblem(row_no, rid, f"bad labels: {exc}"))
            continue
        image = Path(str(row["image_path"]))
        if not image.is_absolute():
            image = path.parent / image
        seen.add(rid)
        records.append(
            Record(rid, str(image), report, lang, split, str(row.get("site") or ""), labels)
        )
    return records, problems


def read_manifest(
    path: str | Path,
    langs: Optional[Iterable[str]] = None,
    split: Optional[str] = None,
    max_bad_fraction: float = 0.0,
    require_report: bool = True,
) -> list[Record]:
    """Read a manifest for training; bad rows are reported and refused beyond a share.

    Raises :class:`SiteDataError` naming the rows when more than ``max_bad_fraction`` of
    them are bad, so that nothing ever trains on garbage silently. Training keeps the
    default ``require_report=True``; evaluation passes False to read label-only rows.
    """
    records, problems = parse_manifest(path, langs, require_report)
    total = len(records) + len(problems)
    if total == 0:
        raise SiteDataError(f"manifest {path} has no rows")
    if problems and len(problems) / total > max_bad_fraction:
        if len(problems) <= 3:  # one line names them all
            raise SiteDataError(f"manifest {path}: {len(problems)} of {total} rows are bad: "
                                + "; ".join(str(p) for p in problems))
        listed = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SiteDataError(
            f"manifest {path}: {len(problems)} of {total} rows are bad:\n  {listed}{more}"
        )
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSONL (or CSV by suffix) with image paths relative to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in records:
        row = asdict(rec)
        image = Path(rec.image_path)
        if image.is_absolute():
            try:
                row["image_path"] = str(image.relative_to(path.parent.resolve()))
            except ValueError:
                pass
        rows.append(row)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".csv":
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_FIELDS))
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "labels": json.dumps(row["labels"], sort_keys=True)})
    else:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def deal(records: Iterable[Record], sites: Sequence[str]) -> list[Record]:
    """The same pairs, in the same order, dealt to ``sites`` in turn within each language and
    split, so that every site holds an equal share of every language (an IID partition of a
    federation's data: ``medunic experiment``'s ``partition: dealt``). Only ``site`` changes:
    training on the union sees the same rows as before."""
    if not sites:
        raise ValueError("deal: no sites to deal the pairs to")
    seen: dict[tuple[str, str], int] = {}
    dealt = []
    for rec in records:
        k = seen.get((rec.lang, rec.split), 0)
        seen[(rec.lang, rec.split)] = k + 1
        dealt.append(replace(rec, site=sites[k % len(sites)]))
    return dealt
