"""RSNA Pneumonia Detection Challenge (Kaggle, 2018): labels only, one row per patient.

Released layout: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``, one
row per bounding box, so several rows for a patient with several opacities and one row
with blank box and Target 0 for a patient without) and ``stage_2_train_images/
<patientId>.dcm``, one frontal radiograph per patient. The label is written as
``pneumonia`` (1 when any of the patient's rows says 1): it is not one of our FINDINGS,
so evaluation, which scores FINDINGS only, does not use it yet; nothing else is mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from medunic_core.data.adapters.base import Candidate, Problem, Row, iter_csv, locate, register, split_rule

TARGETS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


@register("rsna-pneumonia", reports=False)
def read(
    root: Path,
    site: str,
    *,
    labels: str = "stage_2_train_labels.csv",
    images: str = "stage_2_train_images",
    split: str = "hash",
    val_fraction: str = "0.1",
    test_fraction: str = "0.2",
) -> Iterator[Row]:
    """RSNA Pneumonia (en, labels only): one row per patient, label "pneumonia", split by patient.

    Options: ``labels`` and ``images`` name the CSV and the DICOM folder under --root (stage 1
    names work too); ``split`` hash|train|val|test (hash: by patientId with
    ``val_fraction`` / ``test_fraction``). A patient any of whose rows is malformed is
    left out and reported, since the rows that are left could not be trusted to be all.
    """
    to_split = split_rule("rsna-pneumonia", split, val_fraction, test_fraction)
    csv_path = locate(root, labels)
    labels = csv_path.name
    targets: dict[str, int] = {}
    first_line: dict[str, int] = {}
    bad: dict[str, str] = {}
    for line, row in enumerate(iter_csv(csv_path, ["patientId", "Target"]), start=2):
        pid = (row.get("patientId") or "").strip()
        if not pid:
            yield Problem("", f"{labels} line {line}", "malformed row: empty patientId")
            continue
        first_line.setdefault(pid, line)
        target = TARGETS.get((row.get("Target") or "").strip())
        if target is None:
            bad.setdefault(pid, f"malformed Target: {row.get('Target')!r} on line {line} (expected 0 or 1)")
            continue
        targets[pid] = max(targets.get(pid, 0), target)
    image_dir = root / images
    for pid, line in first_line.items():  # in file order, one row per patient
        source = f"{labels} line {line}"
        if pid in bad:
            yield Problem(pid, source, bad[pid])
            continue
        yield Candidate(pid, str(image_dir / f"{pid}.dcm"), "", "en", to_split(pid), site,
                        {"pneumonia": targets[pid]}, source)
