"""SIIM-ACR Pneumothorax Segmentation (2019): labels only, one row per image.

Released layout: ``train-rle.csv`` (header ``ImageId, EncodedPixels``, with the space) with
one row per pneumothorax mask in run-length encoding, or a single row with ``-1`` for an
image without pneumothorax, and the DICOMs in nested folders
``dicom-images-train/<study uid>/<series uid>/<ImageId>.dcm``. The masks are reduced to the
image-level label ``pneumothorax``; the DICOM is found anywhere under --root by its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from medunic_core.data.adapters.base import Candidate, Problem, Row, iter_csv, locate, register, split_rule
from medunic_core.errors import SiteDataError

LABEL_FILES = ("train-rle.csv", "stage_2_train.csv")  # the 2019 release; Kaggle's stage 2 name


def _mask_label(value: str) -> int | None:
    """0 for "-1" (no pneumothorax), 1 for a run-length mask (start/length pairs), None if neither."""
    value = value.strip()
    if value == "-1":
        return 0
    tokens = value.split()
    if tokens and len(tokens) % 2 == 0 and all(t.isdigit() for t in tokens):
        return 1
    return None


def index_dicoms(folder: Path) -> dict[str, list[Path]]:
    """Every ``*.dcm`` under ``folder`` by file stem (the ImageId), walked once."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() == ".dcm" and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


@register("siim-acr", reports=False)
def read(
    root: Path,
    site: str,
    *,
    labels: str = "auto",
    images: str = ".",
    split: str = "hash",
    val_fraction: str = "0.1",
    test_fraction: str = "0.2",
) -> Iterator[Row]:
    """SIIM-ACR Pneumothorax (en, labels only): one row per image, label from the masks, DICOM by name.

    Options: ``labels`` the CSV under --root (auto: train-rle.csv or stage_2_train.csv);
    ``images`` the folder searched for <ImageId>.dcm (default all of --root); ``split``
    hash|train|val|test (hash: by ImageId, as the CSV has no patient id). An image with a
    malformed mask row, or with both "-1" and a mask, is left out and reported.
    """
    to_split = split_rule("siim-acr", split, val_fraction, test_fraction)
    if labels == "auto":
        labels = next((n for n in LABEL_FILES if (root / n).is_file() or (root / f"{n}.gz").is_file()), LABEL_FILES[0])
    csv_path = locate(root, labels)
    labels = csv_path.name
    rows = iter_csv(csv_path, ["ImageId"])
    image_dir = root / images
    if not image_dir.is_dir():
        raise SiteDataError(f"siim-acr: --opt images={images}: {image_dir} is not a folder")
    dicoms = index_dicoms(image_dir)
    first_line: dict[str, int] = {}
    found: dict[str, set[int]] = {}
    bad: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): v for k, v in row.items() if k is not None}  # the header says " EncodedPixels"
        if "EncodedPixels" not in row:
            raise SiteDataError(f"{csv_path}: no EncodedPixels column; found {sorted(row)}")
        image_id = (row.get("ImageId") or "").strip()
        if not image_id:
            yield Problem("", f"{labels} line {line}", "malformed row: empty ImageId")
            continue
        first_line.setdefault(image_id, line)
        label = _mask_label(row.get("EncodedPixels") or "")
        if label is None:
            shown = (row.get("EncodedPixels") or "")[:40]
            bad.setdefault(image_id, f"malformed EncodedPixels: {shown!r} on line {line} (expected -1 or "
                                     "run-length pairs)")
            continue
        found.setdefault(image_id, set()).add(label)
    for image_id, line in first_line.items():  # in file order, one row per image
        source = f"{labels} line {line}"
        if image_id in bad:
            yield Problem(image_id, source, bad[image_id])
            continue
        if len(found[image_id]) > 1:
            yield Problem(image_id, source, "conflicting EncodedPixels: both -1 and a mask")
            continue
        paths = dicoms.get(image_id, [])
        if not paths:
            yield Problem(image_id, source, f"missing file: no {image_id}.dcm under {image_dir}")
            continue
        if len(paths) > 1:
            yield Problem(image_id, source, f"ambiguous file: {len(paths)} files named {image_id}.dcm: "
                                            + ", ".join(str(p.relative_to(image_dir)) for p in paths[:3]))
            continue
        yield Candidate(image_id, str(paths[0]), "", "en", to_split(image_id), site,
                        {"pneumothorax": next(iter(found[image_id]))}, source)
