"""A hospital's own export: a folder of DICOM/PNG/JPG images and one table of reports.

Exports differ in every name, so every column is an option; what is fixed is the meaning:
one table row per image, with an id, the image's path (relative to ``images_dir`` under
``--root``, or absolute), the report text, and optionally a split, a patient id and labels.
The table is a CSV (.csv or .csv.gz) or JSON Lines (.jsonl), one object per line; in JSONL
a key that is left out is an empty value (the id and the image path are required).

Without a split column the split is a hash of the patient id (of the row id when there is
no patient column), so that a patient's images never straddle splits. Labels, if given,
are a JSON object of our finding names to 1/0 (-1 or null: unknown); a name we do not know
is reported rather than dropped, because it is usually a typo that would silently cost a
label. The language is required: nothing in an export says it reliably. A hospital whose
reports come in both languages (``lang=en+es``) names the column that says each report's
language (``lang_column``); a row of a language the site does not hold is a problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from medunic_core.constants import FINDINGS, LANGUAGES
from medunic_core.data.adapters.base import (
    Candidate, Problem, Row, is_missing, iter_csv, locate, normalize_split, register, split_rule)
from medunic_core.data.language import site_languages
from medunic_core.errors import ConfigError

@dataclass(frozen=True)
class Columns:
    """The export's column names; an empty name is a column the export does not have."""

    id: str
    image: str
    report: str
    split: str = ""
    patient: str = ""
    labels: str = ""
    lang: str = ""

    def required(self) -> list[str]:
        return [c for c in (self.id, self.image, self.report, self.split, self.patient, self.labels, self.lang) if c]


POSITIVE = (1, True, "1", "1.0", "true")  # 1.0 == 1, so floats are covered
NEGATIVE = (0, False, "0", "0.0", "false")
UNKNOWN = (-1, "-1", "-1.0", None, "")


def parse_labels(value: Any) -> dict[str, int]:
    """A labels cell (a JSON object or its text) -> ours; ValueError says what is wrong."""
    if is_missing(value):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg}): {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object of finding -> 1/0: {value!r}")
    out: dict[str, int] = {}
    for name, v in value.items():
        if name not in FINDINGS:
            raise ValueError(f"unknown finding {name!r}; known: {', '.join(FINDINGS)}")
        v = v.strip().lower() if isinstance(v, str) else v
        if v in UNKNOWN:
            continue
        if v in POSITIVE or v in NEGATIVE:
            out[name] = 1 if v in POSITIVE else 0
        else:
            raise ValueError(f"{name}={v!r} is not 1, 0, -1 or null")
    return out


def _table(path: Path, required: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a CSV (header checked now) or JSONL table; a JSONL line that is not
    an object becomes a row with ``__error__`` (reported by line; the rest is still used)."""
    if path.name.endswith((".csv", ".csv.gz")):
        return ((f"{path.name} row {n}", row) for n, row in enumerate(iter_csv(path, required), start=1))
    return _jsonl(path)


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = {"__error__": f"not JSON: {exc.msg}"}
            yield f"{path.name} line {n}", row if isinstance(row, dict) else {"__error__": "not a JSON object"}


@register("hospital")
def read(root: Path, site: str, *, reports: str = "reports.csv", lang: str = "", id_column: str = "id",
         image_column: str = "image", report_column: str = "report", split_column: str = "",
         patient_column: str = "", labels_column: str = "", lang_column: str = "", images_dir: str = "",
         split: str = "hash", val_fraction: str = "0.1", test_fraction: str = "0.2") -> Iterator[Row]:
    """A hospital export (lang=en|es|en+es required): images + a CSV/JSONL of reports, columns named by options.

    ``reports``: the table (absolute or under ``root``); ``*_column``: its column names
    (``split_column``, ``patient_column``, ``labels_column`` and ``lang_column`` are optional;
    ``lang_column`` is required with ``lang=en+es``); ``images_dir``:
    the folder image paths are relative to (under ``root``; default ``root``); without a
    split column, ``split``: ``hash`` (of the patient, with the fractions) or one split for all.
    """
    try:
        allowed = site_languages(lang)
    except ConfigError:
        raise ConfigError(f"hospital: --opt lang= is required and must be one of {LANGUAGES} or en+es, "
                          f"got {lang!r}") from None
    if len(allowed) > 1 and not lang_column:
        raise ConfigError(f"hospital: lang={lang} needs --opt lang_column=COLUMN, the column that says each "
                          "report's language")
    split_of = split_rule("hospital", split, val_fraction, test_fraction)
    if not reports.endswith((".csv", ".csv.gz", ".jsonl")):
        raise ConfigError(f"hospital: reports={reports!r} must be a .csv, .csv.gz or .jsonl file")
    path = locate(root, reports)
    columns = Columns(id_column, image_column, report_column, split_column, patient_column, labels_column,
                      lang_column)
    return _rows(_table(path, columns.required()), root / images_dir, site, allowed, columns, split_of)


def _rows(rows: Iterable[tuple[str, dict[str, Any]]], images: Path, site: str, langs: tuple[str, ...],
          columns: Columns, split_of: Callable[[str], str]) -> Iterator[Row]:
    for where, row in rows:
        rid = "" if is_missing(row.get(columns.id)) else str(row[columns.id]).strip()
        if "__error__" in row:
            yield Problem(rid, where, f"malformed row: {row['__error__']}")
            continue
        image = "" if is_missing(row.get(columns.image)) else str(row[columns.image]).strip()
        if not rid or not image:
            yield Problem(rid, where, f"malformed row: empty {columns.id if not rid else columns.image}")
            continue
        row_split: Optional[str]
        if columns.split:
            row_split = normalize_split(str(row.get(columns.split) or ""))
            if row_split is None:
                yield Problem(rid, where, f"unknown split: {row.get(columns.split)!r} is not train, val or test")
                continue
        else:
            patient = row.get(columns.patient) if columns.patient else rid
            if is_missing(patient):
                yield Problem(rid, where, f"no patient id: {columns.patient} is empty (needed for its split)")
                continue
            row_split = split_of(str(patient).strip())
        try:
            labels = parse_labels(row.get(columns.labels)) if columns.labels else {}
        except ValueError as exc:
            yield Problem(rid, where, f"bad labels: {exc}")
            continue
        row_lang = str(row.get(columns.lang) or "").strip().lower() if columns.lang else langs[0]
        if row_lang not in langs:
            found = "empty" if not row_lang else f"{row_lang!r}, not one of the site's {'+'.join(langs)}"
            yield Problem(rid, where, f"wrong language: {columns.lang} is {found}")
            continue
        report = row.get(columns.report)
        yield Candidate(rid, str(images / image), "" if is_missing(report) else str(report), row_lang, row_split,
                        site, labels, where)
