"""CheXpert (Stanford, v1.0 and v1.0-small): labels only, for zero-shot and linear probing.

Released layout: ``CheXpert-v1.0[-small]/{train,valid}.csv`` with a ``Path`` column
relative to the folder above the release (``CheXpert-v1.0-small/train/patient00001/
study1/view1_frontal.jpg``), ``Frontal/Lateral`` and 14 label columns holding 1.0, 0.0,
-1.0 (uncertain) or blank (not mentioned). ``--root`` may be the release folder itself or
the folder that holds it. There are no reports: rows are written with report "".
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from medunic_core.data.adapters.base import CHEXPERT_LABELS, Candidate, Problem, Row, iter_csv, register, split_rule
from medunic_core.errors import ConfigError, SiteDataError

log = logging.getLogger(__name__)

FOLDERS = {"small": "CheXpert-v1.0-small", "full": "CheXpert-v1.0"}
LABELS = CHEXPERT_LABELS
VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": None}
VIEWS = {"frontal": ("Frontal",), "lateral": ("Lateral",), "all": ("Frontal", "Lateral")}
UNCERTAIN = {"unknown": None, "positive": 1, "negative": 0}
PATIENT = re.compile(r"^patient\d+$")


def find_release(root: Path, folder: str) -> Path:
    """The folder holding train.csv/valid.csv: ``root`` itself or ``root/<release>``.

    ``folder`` is "auto", "small", "full" or a folder name; with "auto" and both releases
    present, the choice is the user's (they differ in image size, not in labels).
    """
    if folder != "auto":
        name = FOLDERS.get(folder, folder)
        for candidate in (root / name, root):
            if candidate.name == name and any((candidate / f).is_file() for f in ("train.csv", "valid.csv")):
                return candidate
        raise SiteDataError(f"chexpert: no {name}/train.csv or valid.csv under {root}")
    if any((root / f).is_file() for f in ("train.csv", "valid.csv")):
        return root
    found = [root / n for n in FOLDERS.values()
             if (root / n / "train.csv").is_file() or (root / n / "valid.csv").is_file()]
    if len(found) > 1:
        raise ConfigError(f"chexpert: both {found[0].name} and {found[1].name} are under {root}; "
                          "choose one with --opt folder=small or --opt folder=full")
    if not found:
        raise SiteDataError(f"chexpert: no train.csv or valid.csv in {root} or in {', '.join(FOLDERS.values())} "
                            "under it (is --root the release folder or the folder above it?)")
    return found[0]


@register("chexpert", reports=False)
def read(
    root: Path,
    site: str,
    *,
    folder: str = "auto",
    views: str = "frontal",
    uncertain: str = "unknown",
    valid_split: str = "test",
    val_fraction: str = "0.1",
    test_fraction: str = "0.0",
) -> Iterator[Row]:
    """CheXpert v1.0(-small) (en, labels only): frontal views, valid.csv as test, 6 labels mapped.

    Options: ``folder`` auto|small|full|NAME; ``views`` frontal|lateral|all (left-out views
    are counted in the log, not reported as problems); ``uncertain`` unknown|positive|
    negative for -1.0 labels (blank is always unknown); ``valid_split`` for valid.csv rows;
    train.csv patients go to val/test by a hash of the patient id with ``val_fraction`` /
    ``test_fraction`` (default: val 10%, no test, because valid.csv is the test set).
    """
    if views not in VIEWS:
        raise ConfigError(f"chexpert: --opt views={views!r}; use one of {sorted(VIEWS)}")
    if uncertain not in UNCERTAIN:
        raise ConfigError(f"chexpert: --opt uncertain={uncertain!r}; use one of {sorted(UNCERTAIN)}")
    if valid_split not in ("train", "val", "test"):
        raise ConfigError(f"chexpert: --opt valid_split={valid_split!r}; use train, val or test")
    train_split = split_rule("chexpert", "hash", val_fraction, test_fraction)
    release = find_release(root, folder)
    required = ["Path", "Frontal/Lateral", *LABELS]
    skipped = 0
    for csv_name in ("train.csv", "valid.csv"):
        path = release / csv_name
        if not path.is_file():
            log.warning("chexpert: %s is missing; its split will be empty", path)
            continue
        for line, row in enumerate(iter_csv(path, required), start=2):  # line 1 is the header
            source = f"{csv_name} line {line}"
            raw = (row.get("Path") or "").strip()
            rel = PurePosixPath(raw)
            # Path = <release folder>/<train|valid>/<patient>/<study>/<view file>
            if len(rel.parts) != 5 or not PATIENT.match(rel.parts[2]):
                yield Problem(raw, source, f"malformed Path: {raw!r} (expected "
                                           "<release>/<train|valid>/patientNNNNN/studyN/<view>.jpg)")
                continue
            rid, patient = str(rel.relative_to(rel.parts[0]).with_suffix("")), rel.parts[2]
            view = (row.get("Frontal/Lateral") or "").strip()
            if view not in VIEWS["all"]:
                yield Problem(rid, source, f"malformed Frontal/Lateral: {view!r} (expected Frontal or Lateral)")
                continue
            if view not in VIEWS[views]:
                skipped += 1
                continue
            labels: dict[str, int] = {}
            bad = [c for c in LABELS if (row.get(c) or "").strip() not in VALUES]
            if bad:
                yield Problem(rid, source, "malformed label: " + ", ".join(f"{c}={row.get(c)!r}" for c in bad)
                              + " (expected 1.0, 0.0, -1.0 or blank)")
                continue
            for column, finding in LABELS.items():
                value = VALUES[(row.get(column) or "").strip()]
                value = UNCERTAIN[uncertain] if value == -1 else value
                if value is not None:
                    labels[finding] = value
            split = valid_split if csv_name == "valid.csv" else train_split(patient)
            image = release.joinpath(*rel.parts[1:])
            yield Candidate(rid, str(image), "", "en", split, site, labels, source)
    if skipped:
        log.info("chexpert: %d views other than %s left out (--opt views=all keeps them)", skipped, views)
