"""MIMIC-CXR: MIMIC-CXR-JPG images and tables with the MIMIC-CXR free-text reports (English).

Released layout (PhysioNet): under the MIMIC-CXR-JPG root ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``
and the tables ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz)``; the reports (from
the MIMIC-CXR, not -JPG, release) at ``files/pXX/pSUBJECT/sSTUDY.txt`` under their own root,
often unpacked elsewhere (``reports_root``).

One row per image (id = dicom_id); the report is the study's FINDINGS + IMPRESSION (see
:mod:`.sections` for header variants and the fallback). Frontal views (PA, AP) by default,
because a lateral image does not show what a report of the study says in the way a frontal
one does; images of other views are left out quietly (a choice, not a problem), images
whose view is not recorded are reported. Splits are the official ones (validate -> val).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

from medunic_core.data.adapters.base import (
    CHEXPERT_LABELS, Candidate, Problem, Row, is_missing, iter_csv, locate, map_labels, normalize_split, parse_views,
    register)
from medunic_core.data.adapters.sections import FALLBACKS, report_text
from medunic_core.errors import ConfigError

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABELS_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"

LABEL_COLUMNS = CHEXPERT_LABELS  # the labeler CSV has the CheXpert columns
NO_FINDING = "No Finding"


def study_labels(row: dict[str, str]) -> dict[str, int]:
    """One CheXpert row -> our labels: 1.0 -> 1, 0.0 -> 0, -1.0 (uncertain) and blank ->
    unknown; "No Finding" = 1.0 makes the blank ones 0 (by the labeler's definition no
    pathology was mentioned as present or uncertain)."""
    labels = map_labels(row, LABEL_COLUMNS)
    if row.get(NO_FINDING, "").strip() in ("1", "1.0"):
        labels.update({f: 0 for c, f in LABEL_COLUMNS.items() if f not in labels and is_missing(row.get(c))})
    return labels


@register("mimic-cxr")
def read(root: Path, site: str, *, views: str = "PA,AP", reports_root: str = "", metadata_csv: str = METADATA_CSV,
         split_csv: str = SPLIT_CSV, labels_csv: str = LABELS_CSV, fallback: str = "last_paragraph") -> Iterator[Row]:
    """MIMIC-CXR-JPG + reports (en): frontal views, official split, CheXpert labels.

    ``views``: ViewPosition values to keep (comma-separated) or ``all``; ``reports_root``:
    the folder holding the reports' ``files/pXX/...`` tree (absolute or under ``root``;
    default ``root``); ``*_csv``: the tables (absolute or under ``root``; .gz optional),
    ``labels_csv=none`` for no labels (or the NegBio table instead); ``fallback``:
    ``last_paragraph`` or ``none`` (a report without FINDINGS and IMPRESSION is a problem).
    """
    wanted = parse_views(views)
    if fallback not in FALLBACKS:
        raise ConfigError(f"mimic-cxr: fallback={fallback!r} must be one of {FALLBACKS}")
    reports = root / reports_root if reports_root else root
    if not (reports / "files").is_dir():
        raise ConfigError(f"mimic-cxr: {reports / 'files'} is not a folder; point --opt reports_root= at the "
                          "folder that holds the reports' files/pXX/... tree")
    metadata_path = locate(root, metadata_csv)
    metadata = iter_csv(metadata_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    split_path = locate(root, split_csv)
    splits = {r["dicom_id"].strip(): r["split"] for r in iter_csv(split_path, ["dicom_id", "split"])}
    labels: dict[str, dict[str, int]] = {}
    if labels_csv.strip().lower() not in ("", "none"):
        rows = iter_csv(locate(root, labels_csv), ["study_id", *LABEL_COLUMNS])
        labels = {r["study_id"].strip(): study_labels(r) for r in rows}
    return _rows(root, reports, site, metadata, metadata_path.name, splits, split_path.name, labels, wanted, fallback)


def _rows(root: Path, reports: Path, site: str, metadata: Iterable[dict[str, str]], metadata_name: str,
          splits: dict[str, str], split_name: str, labels: dict[str, dict[str, int]],
          wanted: Optional[frozenset[str]], fallback: str) -> Iterator[Row]:
    texts: dict[str, tuple[Optional[str], str]] = {}  # study -> (report, problem if none)
    for n, row in enumerate(metadata, start=1):
        where = f"{metadata_name} row {n}"
        dicom, subject, study = (row[c].strip() for c in ("dicom_id", "subject_id", "study_id"))
        if not dicom or not subject.isdigit() or not study.isdigit():
            yield Problem(dicom, where, f"malformed row: dicom_id={dicom!r} subject_id={subject!r} study_id={study!r}")
            continue
        view = row["ViewPosition"].strip().upper()
        if wanted is not None:
            if not view:
                yield Problem(dicom, where, "unknown view: ViewPosition is empty (--opt views=all keeps such images)")
                continue
            if view not in wanted:
                continue
        split = normalize_split(splits.get(dicom, ""))
        if split is None:
            said = f"says {splits[dicom]!r}" if dicom in splits else "has no row"
            yield Problem(dicom, where, f"no split: {split_name} {said} for this image")
            continue
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        if study not in texts:
            texts[study] = _report(reports / folder / f"s{study}.txt", fallback)
        text, problem = texts[study]
        if text is None:
            yield Problem(dicom, where, problem)
            continue
        yield Candidate(dicom, str(root / folder / f"s{study}" / f"{dicom}.jpg"), text, "en", split, site,
                        labels.get(study, {}), where)


def _report(path: Path, fallback: str) -> tuple[Optional[str], str]:
    if not path.is_file():
        return None, f"missing report: {path}"
    text = report_text(path.read_text(encoding="utf-8", errors="replace"), fallback)
    if text is None:
        tried = " (nor a last paragraph other than a request section)" if fallback == "last_paragraph" else ""
        return None, f"no findings or impression: {path} has neither{tried}"
    return text, ""

