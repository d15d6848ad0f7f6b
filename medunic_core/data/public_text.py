"""A federation with real report text: PadChest's Spanish and Open-i's English reports.

The ``torchxrayvision`` package ships both as data files (the PadChest labels CSV with its
pre-stemmed Spanish reports, and ``NLMCXR_reports.tgz`` with Open-i's XML reports and MeSH
tags). They are read straight from the installed package's data folder, without
importing it, through our own adapters (``padchest``, ``openi``). The images are not
there, so each report gets a film rendered from its labels by the synthetic renderer,
with a different acquisition profile per community. The text then carries real
community differences (language, stemming, report style, prevalence), which synthetic
reports do not.

Labels: a finding tagged in the source is drawn and labelled 1; every other finding is
absent from the rendered film and labelled 0 (the image, not the report, defines them).
"""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medunic_core.constants import FINDINGS
from medunic_core.data.adapters import Candidate, openi, padchest
from medunic_core.data.adapters.base import is_missing
from medunic_core.data.manifest import Record, write_manifest
from medunic_core.data.synthetic.generator import specify_findings
from medunic_core.data.synthetic.renderer import render_image
from medunic_core.errors import ConfigError

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
OPENI_REPORTS = "NLMCXR_reports.tgz"
INSTALL_HINT = ("pip install --no-deps torchxrayvision==1.5.7  (only its data files are used: "
                "the PadChest labels CSV and Open-i's reports)")
SITES = {"en-1": ("en", "default"), "es-1": ("es", "highres")}  # site -> (language, acquisition profile)


def torchxrayvision_data() -> Path:
    """The installed torchxrayvision's data folder, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the public-text federation needs the torchxrayvision package's data files: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in (PADCHEST_CSV, OPENI_REPORTS) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {missing}; install the version that ships them: {INSTALL_HINT}")
    return folder


def _usable(rows: Iterable) -> list[Candidate]:
    """Candidates with a report and labels; one per id and per report text (Open-i lists
    every image of a report)."""
    out, seen = [], set()
    for row in rows:
        if (isinstance(row, Candidate) and not is_missing(row.report) and row.labels
                and row.report not in seen and row.id not in seen):
            seen.update((row.report, row.id))
            out.append(row)
    return out


def _sample(rows: list[Candidate], n: int, rng: np.random.Generator) -> list[Candidate]:
    """``n`` rows, half with a positive finding where there are enough (both kinds matter)."""
    positive = [r for r in rows if any(v == 1 for v in r.labels.values())]
    negative = [r for r in rows if not any(v == 1 for v in r.labels.values())]
    take_pos = min(len(positive), n // 2)
    take_neg = min(len(negative), n - take_pos)
    take_pos = min(len(positive), n - take_neg)
    picked = [positive[i] for i in rng.choice(len(positive), take_pos, replace=False)]
    picked += [negative[i] for i in rng.choice(len(negative), take_neg, replace=False)]
    return sorted(picked, key=lambda r: r.id)


def build_public_text(out: str | Path, per_site: int = 400, seed: int = 0, image_size: int = 128,
                      data: Optional[Path] = None, progress: bool = True) -> Path:
    """Write ``out/manifest.jsonl`` (sites en-1: Open-i, es-1: PadChest) and the rendered
    films; an existing manifest is reused."""
    out = Path(out).resolve()
    manifest = out / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    data = data or torchxrayvision_data()
    openi_root = out / "openi"
    if not (openi_root / "ecgen-radiology").is_dir():
        openi_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data / OPENI_REPORTS) as tar:
            tar.extractall(openi_root, filter="data")
    sources = {
        "en-1": _usable(openi.read(openi_root, "en-1")),
        "es-1": _usable(padchest.read(data, "es-1", csv=PADCHEST_CSV)),
    }
    rng = np.random.default_rng(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    for site, rows in sources.items():
        lang, profile = SITES[site]
        chosen = _sample(rows, per_site, rng)
        for row in tqdm(chosen, desc=f"rendering {site}", disable=not progress):
            positive = [f for f in FINDINGS if row.labels.get(f) == 1]
            film_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(records),)))
            img = render_image(specify_findings(positive, film_rng), profile, film_rng, image_size)
            path = images / f"{site}-{len(records):05d}.png"
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
            records.append(Record(f"{site}-{row.id}", str(path), row.report, lang, row.split, site,
                                  {f: int(f in positive) for f in FINDINGS}))
    return write_manifest(records, manifest)
