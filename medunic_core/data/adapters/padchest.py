"""PadChest (BIMCV, Spanish): the 160K labels CSV with pre-stemmed reports, 16-bit PNGs.

Released layout: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`` at the top
and the images at ``<ImageDir>/<ImageID>`` (ImageDir is the zip number, 0..54). The reports
are kept as released (lower-case, stemmed Spanish): that is the text the Spanish side of
the model sees in the Med-UniC setting.

Projections: PA, AP and AP_horizontal (supine/bedside AP) by default, the frontal ones;
lateral (L) and rib (COSTAL) views are left out quietly (a choice, not a problem). A
projection PadChest itself did not resolve (UNK) is reported, as are rows the curators
marked EXCLUDE (projection or label).

Split: by a hash of PatientID, so that a patient's images never straddle splits.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from medunic_core.data.adapters.base import (
    Candidate, Problem, Row, is_missing, iter_csv, locate, map_tags, parse_views, register, split_rule)

LABELS_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
COLUMNS = ("ImageID", "ImageDir", "Projection", "PatientID", "Report", "Labels")
PROJECTIONS = frozenset({"PA", "AP", "AP_HORIZONTAL", "L", "COSTAL"})  # what PadChest resolved
EXCLUDED = "exclude"

# PadChest label names (its label tree; the labellers tagged the most specific node) -> ours.
# Left out on purpose: "pseudonodule" (a nodule-like shadow that is not one), masses (not
# nodules), "pericardial effusion" (not pleural), "heart insufficiency" (not edema itself).
TAGS = {
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion",
    "loculated pleural effusion": "pleural_effusion",
    "loculated fissural effusion": "pleural_effusion",
    "pneumothorax": "pneumothorax",
    "hydropneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "nodule": "nodule",
    "multiple nodules": "nodule",
    "pulmonary edema": "edema",
}
NORMAL = ("normal",)


def parse_label_list(value: str) -> Optional[list[str]]:
    """The Labels cell, a Python literal list like "['normal', ' pleural effusion']" (names
    carry stray spaces and empty strings), -> stripped names; None if it is not such a list."""
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(t, str) for t in parsed):
        return None
    return [t.strip() for t in parsed if t.strip()]


@register("padchest")
def read(root: Path, site: str, *, projections: str = "PA,AP,AP_horizontal", csv: str = LABELS_CSV,
         absent: str = "unknown", split: str = "hash", val_fraction: str = "0.1", test_fraction: str = "0.2"
         ) -> Iterator[Row]:
    """PadChest (es): frontal projections, split by patient, PadChest labels mapped.

    ``projections``: Projection values to keep (comma-separated) or ``all``; ``csv``: the
    labels table (absolute or under ``root``; .gz optional); ``absent``: ``unknown`` (a
    finding that is not tagged is unknown, unless the image is tagged normal) or ``negative``;
    ``split``: ``hash`` (of PatientID, with the fractions) or one split for every row.
    """
    wanted = parse_views(projections)
    split_of = split_rule("padchest", split, val_fraction, test_fraction)
    map_tags([], TAGS, absent=absent)  # checks the option now, not at the first row
    path = locate(root, csv)
    rows = iter_csv(path, COLUMNS)
    return _rows(root, site, rows, path.name, wanted, absent, split_of)


def _rows(root: Path, site: str, rows: Iterable[dict[str, str]], name: str, wanted: Optional[frozenset[str]],
          absent: str, split_of: Callable[[str], str]) -> Iterator[Row]:
    for n, row in enumerate(rows, start=1):
        where = f"{name} row {n}"
        image_id, image_dir, patient = (row[c].strip() for c in ("ImageID", "ImageDir", "PatientID"))
        if not image_id or is_missing(image_dir) or is_missing(patient):
            yield Problem(image_id, where, f"malformed row: ImageID={image_id!r} ImageDir={image_dir!r} "
                                           f"PatientID={patient!r}")
            continue
        projection = row["Projection"].strip().upper()
        if projection == EXCLUDED.upper():
            yield Problem(image_id, where, "excluded: Projection is EXCLUDE")
            continue
        if wanted is not None:
            if projection not in PROJECTIONS:
                yield Problem(image_id, where, f"unknown view: Projection {row['Projection']!r} "
                                               "(--opt projections=all keeps such images)")
                continue
            if projection not in wanted:
                continue
        labels: dict[str, int] = {}
        if not is_missing(row["Labels"]):  # a row without labels still has an image and a report
            tags = parse_label_list(row["Labels"])
            if tags is None:
                yield Problem(image_id, where, f"bad labels: Labels {row['Labels'][:80]!r} is not a list like "
                                               "['normal']")
                continue
            if EXCLUDED in tags:
                yield Problem(image_id, where, "excluded: labelled 'exclude' by PadChest (report unusable)")
                continue
            labels = map_tags(tags, TAGS, NORMAL, absent)
        report = "" if is_missing(row["Report"]) else row["Report"]
        yield Candidate(image_id, str(root / image_dir / image_id), report, "es", split_of(patient), site, labels,
                        where)

