"""A synthetic federation: per-site chest films, bilingual reports and one manifest.

Every record is a pure function of ``(seed, site index, record index)``: its generator is
``SeedSequence(seed, spawn_key=(site, index))``, split into independent children for the
findings, the image, the report and the file format. Results therefore do not depend on
the order of generation or on the number of worker processes, and changing the report
templates never changes a pixel.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from medunic_core.config import SynthConfig
from medunic_core.constants import FINDINGS, LANGUAGES
from medunic_core.data.dicom import write_dicom
from medunic_core.data.language import site_languages
from medunic_core.data.manifest import Record, write_manifest
from medunic_core.data.synthetic.renderer import ZONED, Finding, Profile, get_profile, render_image
from medunic_core.data.synthetic.reports import write_report
from medunic_core.errors import ConfigError

MANIFEST_NAME = "manifest.jsonl"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name

# How the details of a positive finding are drawn.
SEVERITY_WEIGHTS: dict[str, float] = {"mild": 0.4, "moderate": 0.35, "severe": 0.25}
LATERALITY_WEIGHTS: dict[str, dict[str, float]] = {
    "cardiomegaly": {"none": 1.0},
    "pleural_effusion": {"right": 0.35, "left": 0.3, "bilateral": 0.35},
    "pneumothorax": {"right": 0.5, "left": 0.5},
    "consolidation": {"right": 0.45, "left": 0.4, "bilateral": 0.15},
    "nodule": {"right": 0.5, "left": 0.5},
    "edema": {"bilateral": 1.0},
}
ZONE_WEIGHTS: dict[str, dict[str, float]] = {
    "consolidation": {"upper": 0.3, "middle": 0.2, "lower": 0.5},
    "nodule": {"upper": 0.45, "middle": 0.25, "lower": 0.3},
}
P_UNCERTAIN = 0.3  # share of mild findings that the report hedges on

# File formats: DICOM variants exercise every conversion a reader must get right.
P_PNG16 = 0.5  # among PNGs; the rest are 8-bit
P_MONOCHROME1 = 0.3  # among DICOMs: inverted stored values
P_RESCALE = 0.5  # among DICOMs: a non-identity rescale slope/intercept
P_WINDOW = 0.6  # among DICOMs: a window centre/width covering the full range


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def specify_findings(names: Iterable[str], rng: np.random.Generator) -> dict[str, Finding]:
    """Draw side, severity, zone and hedging for bare finding names (e.g. real labels)."""
    wanted = set(names)
    unknown = wanted - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; expected some of {list(FINDINGS)}")
    out: dict[str, Finding] = {}
    for name in FINDINGS:
        if name not in wanted:
            continue
        laterality = _choose(rng, LATERALITY_WEIGHTS[name])
        severity = _choose(rng, SEVERITY_WEIGHTS)
        zone = None
        if name in ZONED:
            zones = dict(ZONE_WEIGHTS[name])
            if laterality == "bilateral":
                zones.pop("middle")
            zone = _choose(rng, zones)
        uncertain = severity == "mild" and rng.random() < P_UNCERTAIN
        out[name] = Finding(name, laterality, severity, zone, uncertain)
    return out


def sample_findings(profile: Profile, rng: np.random.Generator) -> dict[str, Finding]:
    """Independent findings at the profile's prevalences (about 35% of films come out normal)."""
    draws = rng.random(len(FINDINGS))
    present = [n for n, d in zip(FINDINGS, draws) if d < profile.prevalence.get(n, 0.0)]
    return specify_findings(present, rng)


@dataclass(frozen=True)
class _Job:
    """Everything one worker needs to make one record (picklable, no config object)."""

    seed: int
    site_index: int
    site: str
    lang: str
    profile: str
    index: int
    split: str
    size: int
    dicom_fraction: float
    image_dir: str
    langs: tuple[str, ...] = ()  # a bilingual case: one report per language of the same film


def _record_rng(seed: int, site_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, index)))


def _write_image(img: np.ndarray, stem: Path, rid: str, rng: np.random.Generator, dicom_fraction: float) -> Path:
    """Quantise a 0..1 film and write it as 8/16-bit PNG or as one of several DICOM variants."""
    if rng.random() < dicom_fraction:
        bits = 12 if rng.random() < 0.5 else 16
        top = 2**bits - 1
        stored = np.round(img * top).astype(np.uint16)
        photometric = "MONOCHROME2"
        if rng.random() < P_MONOCHROME1:
            photometric, stored = "MONOCHROME1", (top - stored).astype(np.uint16)
        slope, intercept = (float(rng.choice([0.5, 2.0])), -1024.0) if rng.random() < P_RESCALE else (1.0, 0.0)
        window = (intercept + slope * top / 2, slope * (top + 1)) if rng.random() < P_WINDOW else None
        return write_dicom(
            stored,
            stem.with_suffix(".dcm"),
            photometric=photometric,
            bits_stored=bits,
            rescale_slope=slope,
            rescale_intercept=intercept,
            window=window,
            patient_id=rid,
            study_id=rid,
        )
    path = stem.with_suffix(".png")
    if rng.random() < P_PNG16:
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(path, compress_level=3)
    else:
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, compress_level=3)
    return path


def _make_records(job: _Job) -> list[Record]:
    """One record, or for a bilingual case one per language (ids ``<case>-<lang>``, same film)."""
    r_find, r_img, r_report, r_file = _record_rng(job.seed, job.site_index, job.index).spawn(4)
    profile = get_profile(job.profile)
    findings = sample_findings(profile, r_find)
    img = render_image(findings, profile, r_img, job.size)
    rid = f"{job.site}-{job.index:05d}"
    path = _write_image(img, Path(job.image_dir) / rid, rid, r_file, job.dicom_fraction)
    labels = {n: int(n in findings) for n in FINDINGS}
    if not job.langs:
        return [Record(rid, str(path), write_report(findings, job.lang, r_report), job.lang, job.split, job.site,
                       labels)]
    return [Record(f"{rid}-{lang}", str(path), write_report(findings, lang, rng), lang, job.split, job.site, labels)
            for lang, rng in zip(job.langs, r_report.spawn(len(job.langs)))]


def assign_splits(n: int, seed: int, site_index: int, test_fraction: float, val_fraction: float) -> list[str]:
    """Split of each of a site's ``n`` records: a seeded shuffle, then test, val, train."""
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index,))).permutation(n)
    splits = ["train"] * n
    for rank, i in enumerate(order):
        splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def validate_config(cfg: SynthConfig) -> None:
    """Refuse a synthetic config that would fail half-way or produce a misleading dataset."""
    if cfg.image_size < 32:
        raise ConfigError(f"synth.image_size={cfg.image_size}: must be at least 32 pixels")
    for key in ("dicom_fraction", "test_fraction", "val_fraction"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"synth.{key}={value}: must be between 0 and 1")
    if cfg.test_fraction + cfg.val_fraction > 1.0:
        raise ConfigError(
            f"synth.test_fraction + synth.val_fraction = {cfg.test_fraction + cfg.val_fraction}: must not exceed 1"
        )
    if not cfg.sites:
        raise ConfigError("synth.sites is empty; give at least one site (name, lang, n, profile)")
    seen: set[str] = set()
    for i, site in enumerate(cfg.sites):
        where = f"synth.sites[{i}] ({site.name})"
        if not SITE_NAME.match(site.name):
            raise ConfigError(f"{where}: site name must be letters, digits, '-', '_' or '.', it names a folder")
        if site.name in seen:
            raise ConfigError(f"{where}: duplicate site name; site names must be unique")
        seen.add(site.name)
        try:
            site_languages(site.lang)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if site.n < 1:
            raise ConfigError(f"{where}: n={site.n}, a site needs at least one record")
        try:
            get_profile(site.profile)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def _jobs(cfg: SynthConfig, image_root: Path) -> list[_Job]:
    jobs = []
    for s, site in enumerate(cfg.sites):
        image_dir = image_root / site.name
        image_dir.mkdir(parents=True, exist_ok=True)
        splits = assign_splits(site.n, cfg.seed, s, cfg.test_fraction, cfg.val_fraction)
        langs = site_languages(site.lang)  # a site of several languages: its records take them in turn
        jobs.extend(
            _Job(
                seed=int(cfg.seed),
                site_index=s,
                site=site.name,
                lang=langs[i % len(langs)],
                profile=site.profile,
                index=i,
                split=splits[i],
                size=int(cfg.image_size),
                dicom_fraction=float(cfg.dicom_fraction),
                image_dir=str(image_dir),
            )
            for i in range(site.n)
        )
    return jobs


def generate(
    cfg: SynthConfig, out: Optional[Path] = None, progress: bool = True, workers: int = 1
) -> Path:
    """Write ``<out>/images/<site>/<id>.png|.dcm`` and ``<out>/manifest.jsonl``; return the manifest.

    ``out`` defaults to ``cfg.out``. The manifest is byte-identical for the same config
    whatever ``out`` and ``workers`` are (image paths are stored relative to it).
    """
    validate_config(cfg)
    root = Path(out if out is not None else cfg.out).resolve()
    jobs = _jobs(cfg, root / "images")
    return write_manifest(_run_jobs(jobs, progress, workers), root / MANIFEST_NAME)


def _run_jobs(jobs: list[_Job], progress: bool, workers: int) -> list[Record]:
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(32, len(jobs) // (4 * workers)))
            made = pool.map(_make_records, jobs, chunksize=chunk)
            done = list(tqdm(made, total=len(jobs), desc="synth", unit="img", disable=not progress))
    else:
        done = [_make_records(j) for j in tqdm(jobs, desc="synth", unit="img", disable=not progress)]
    return [record for records in done for record in records]


EVAL_SITE = "eval"
EVAL_INDEX = 2**31 - 1  # the evaluation set's spawn key; sites count up from 0


def generate_eval_set(
    cfg: SynthConfig, n: int, out: Path, profiles: Sequence[str], langs: Sequence[str] = LANGUAGES,
    progress: bool = True, workers: int = 1,
) -> Path:
    """A fixed bilingual evaluation set: ``n`` films, each with a report in every language of
    ``langs`` stating the same findings (the cross-lingual retrieval ground truth), all in
    split ``test`` of site ``eval``; acquisition cycles through ``profiles`` (the
    federation's), so no community's scanner is favoured. Its seed stream (``synth.seed``,
    site index EVAL_INDEX) is apart from every site's, so it never repeats a training film."""
    if n < 1 or not profiles:
        raise ConfigError(f"an evaluation set needs at least one case and one profile (got {n}, {list(profiles)})")
    for profile in profiles:
        get_profile(profile)
    root = Path(out).resolve()
    image_dir = root / "images" / EVAL_SITE
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [_Job(seed=int(cfg.seed), site_index=EVAL_INDEX, site=EVAL_SITE, lang=langs[0],
                 profile=profiles[i % len(profiles)], index=i, split="test", size=int(cfg.image_size),
                 dicom_fraction=float(cfg.dicom_fraction), image_dir=str(image_dir), langs=tuple(langs))
            for i in range(n)]
    return write_manifest(_run_jobs(jobs, progress, workers), root / MANIFEST_NAME)


def default_workers() -> int:
    """Worker processes for the CLI: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
