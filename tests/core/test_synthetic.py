"""The synthetic federation: deterministic, findings visible where they should be, reports
consistent with labels in both languages, files every reader can open, and a working CLI."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medunic_core.cli import main
from medunic_core.config import SiteConfig, SynthConfig
from medunic_core.constants import FINDINGS, SPLITS
from medunic_core.data.language import detect_language
from medunic_core.data.manifest import read_manifest
from medunic_core.data.readers import read_image
from medunic_core.data.synthetic import (
    PROFILES,
    Finding,
    Profile,
    generate,
    get_profile,
    render_image,
    sample_findings,
    specify_findings,
    write_report,
)
from medunic_core.data.synthetic.generator import _record_rng, validate_config
from medunic_core.errors import ConfigError

SIZE = 128
CLEAN = Profile("clean", noise=0.0, rotation_deg=0.0, shift=0.0)  # no noise, no pose jitter

# Words that mark a mention of each finding, per language.
STEMS = {
    "en": {
        "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
        "pleural_effusion": ("effusion",),
        "pneumothorax": ("pneumothorax",),
        "consolidation": ("consolidation",),
        "nodule": ("nodul",),
        "edema": ("edema",),
    },
    "es": {
        "cardiomegaly": ("cardiomegalia",),
        "pleural_effusion": ("derrame",),
        "pneumothorax": ("neumotórax",),
        "consolidation": ("consolidaci", "condensaci"),
        "nodule": ("nódulo", "nodular"),
        "edema": ("edema",),
    },
}
NEGATION_CUES = {"en": ("no ", "not ", "without"), "es": ("no ", "sin ", "libres")}


def _pair(findings: dict[str, Finding], seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The same film without and with ``findings`` (fresh generators from one seed)."""
    base = render_image({}, CLEAN, np.random.default_rng(seed), SIZE)
    with_f = render_image(findings, CLEAN, np.random.default_rng(seed), SIZE)
    return base, with_f


def _halves(diff: np.ndarray, rows: slice) -> tuple[float, float]:
    """Summed change in the image-left (patient right) and image-right (patient left) halves."""
    band = diff[rows]
    return float(band[:, : SIZE // 2].sum()), float(band[:, SIZE // 2 :].sum())


def _sentences(report: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=\.)\s+|:\s", report) if s.strip()]


# --- rendering -------------------------------------------------------------------------------


def test_render_image_same_seed_same_pixels_other_seed_differs() -> None:
    f = {"edema": Finding("edema", severity="moderate")}
    a = render_image(f, "portable", np.random.default_rng(11), SIZE)
    b = render_image(f, "portable", np.random.default_rng(11), SIZE)
    c = render_image(f, "portable", np.random.default_rng(12), SIZE)
    assert a.shape == (SIZE, SIZE) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_render_image_looks_like_a_chest() -> None:
    img = render_image({}, CLEAN, np.random.default_rng(0), SIZE)
    lungs = (img[40:90, 20:50].mean() + img[40:90, 78:108].mean()) / 2
    assert img[:8, :8].mean() < 0.15  # air outside the body
    assert lungs < img[40:90, 58:70].mean() - 0.2  # lungs darker than the mediastinum
    assert lungs < img[115:, 30:100].mean() - 0.2  # and than the abdomen below the diaphragm


def test_cardiomegaly_widens_the_heart_shadow() -> None:
    base, big = _pair({"cardiomegaly": Finding("cardiomegaly", severity="moderate")})
    rows = slice(int(0.58 * SIZE), int(0.68 * SIZE))  # just above the diaphragm
    width = lambda img: int((img[rows] > 0.55).sum(axis=1).mean())  # noqa: E731
    assert width(big) > width(base) + 0.08 * SIZE
    assert np.abs(big - base)[: SIZE // 3].max() < 1e-6  # apices untouched


@pytest.mark.parametrize("laterality", ["right", "left"])
def test_pleural_effusion_raises_the_base_on_its_side_only(laterality: str) -> None:
    base, eff = _pair({"pleural_effusion": Finding("pleural_effusion", laterality, "moderate")})
    right, left = _halves(eff - base, slice(SIZE // 2, None))
    affected, other = (right, left) if laterality == "right" else (left, right)
    assert affected > 20.0
    assert abs(other) < 1e-3


def test_pleural_effusion_grows_with_severity() -> None:
    gains = []
    for severity in ("mild", "moderate", "severe"):
        base, eff = _pair({"pleural_effusion": Finding("pleural_effusion", "bilateral", severity)})
        gains.append(float((eff - base).sum()))
    assert 0 < gains[0] < gains[1] < gains[2]


def test_pneumothorax_darkens_the_apex_and_removes_markings() -> None:
    base, ptx = _pair({"pneumothorax": Finding("pneumothorax", "left", "moderate")})
    apex = (slice(int(0.18 * SIZE), int(0.3 * SIZE)), slice(int(0.62 * SIZE), int(0.9 * SIZE)))
    assert ptx[apex].mean() < base[apex].mean() - 0.02
    assert (ptx - base)[apex].min() < -0.1  # the air space beyond the pleural line
    right, left = _halves(ptx - base, slice(None))
    assert left < -5.0 and abs(right) < 1e-3


def test_consolidation_nodule_and_edema_add_opacity_where_expected() -> None:
    base, con = _pair({"consolidation": Finding("consolidation", "right", "severe", "lower")})
    right, left = _halves(con - base, slice(SIZE // 2, None))
    assert right > 20.0 and abs(left) < 1e-3

    base, nod = _pair({"nodule": Finding("nodule", "left", "moderate", "upper")})
    diff = nod - base
    assert diff.max() > 0.1
    assert (np.abs(diff) > 0.02).mean() < 0.03  # small and round, nothing else moves
    assert diff[:, : SIZE // 2].max() < 1e-6

    base, ede = _pair({"edema": Finding("edema", severity="severe")})
    right, left = _halves(ede - base, slice(int(0.3 * SIZE), int(0.7 * SIZE)))
    assert right > 20.0 and left > 20.0  # bilateral perihilar haze


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="portabel.*did you mean 'portable'.*default, portable, highres, lowdose"):
        get_profile("portabel")


def test_portable_profile_is_noisier_softer_and_flatter_than_highres() -> None:
    def film(profile: Profile) -> np.ndarray:
        return render_image({}, profile, np.random.default_rng(5), SIZE)

    noise, detail, spread = {}, {}, {}
    for name in ("portable", "highres"):
        prof = PROFILES[name]
        quiet = film(replace(prof, noise=0.0))
        noise[name] = float((film(prof) - quiet).std())
        detail[name] = float(np.abs(np.diff(quiet, axis=1)).mean())
        spread[name] = float(np.percentile(quiet, 95) - np.percentile(quiet, 5))
    assert noise["portable"] > 2 * noise["highres"]
    assert detail["portable"] < detail["highres"]
    assert spread["portable"] < spread["highres"]


def test_finding_rejects_impossible_specifications() -> None:
    with pytest.raises(ValueError, match="cannot be 'left'"):
        Finding("edema", "left")
    with pytest.raises(ValueError, match="only mild"):
        Finding("nodule", "right", "severe", uncertain=True)
    with pytest.raises(ValueError, match="unknown findings"):
        specify_findings(["pneumonia"], np.random.default_rng(0))


# --- labels and reports ----------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sample_findings_prevalence_is_realistic(profile: str) -> None:
    rng = np.random.default_rng(0)
    draws = [sample_findings(PROFILES[profile], rng) for _ in range(3000)]
    normal = sum(not d for d in draws) / len(draws)
    assert 0.28 <= normal <= 0.45
    for name in FINDINGS:
        assert 0.04 <= sum(name in d for d in draws) / len(draws) <= 0.32


def test_reports_mention_every_positive_finding_in_both_languages() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        findings = specify_findings([n for n in FINDINGS if rng.random() < 0.5], rng)
        for lang in ("en", "es"):
            report = write_report(findings, lang, rng).lower()
            for name in findings:
                assert any(s in report for s in STEMS[lang][name]), (lang, name, report)


def test_reports_hedge_only_on_uncertain_mild_findings() -> None:
    f = {"pneumothorax": Finding("pneumothorax", "right", "mild", uncertain=True)}
    rng = np.random.default_rng(1)
    en = [write_report(f, "en", rng).lower() for _ in range(20)]
    es = [write_report(f, "es", rng).lower() for _ in range(20)]
    assert all(("possible" in r or "cannot be excluded" in r) for r in en)
    assert all(("posible" in r or "no se descarta" in r) for r in es)
    sure = {"pneumothorax": Finding("pneumothorax", "right", "mild")}
    assert not any("possible" in write_report(sure, "en", rng).lower() for _ in range(20))


def test_normal_reports_only_negate_findings() -> None:
    rng = np.random.default_rng(2)
    seen = {"en": "", "es": ""}
    for _ in range(80):
        for lang in ("en", "es"):
            report = write_report({}, lang, rng)
            seen[lang] += report.lower() + " "
            for sentence in _sentences(report):
                if any(s in sentence for stems in STEMS[lang].values() for s in stems):
                    assert any(c in sentence + " " for c in NEGATION_CUES[lang]), (lang, sentence)
    assert "no pleural effusion" in seen["en"]
    assert "sin derrame pleural" in seen["es"]


def test_report_styles_differ_between_communities() -> None:
    rng = np.random.default_rng(3)
    f = specify_findings(["cardiomegaly", "pleural_effusion"], rng)
    en = [write_report(f, "en", rng) for _ in range(30)]
    es = [write_report(f, "es", rng) for _ in range(30)]
    assert all("FINDINGS:" in r and "IMPRESSION:" in r for r in en)
    assert all(r == r.lower() and "hallazgos:" not in r for r in es)
    assert np.mean([len(r.split()) for r in es]) < 0.6 * np.mean([len(r.split()) for r in en])
    # A community's habits are data: Spanish words in the structured style.
    structured_es = write_report(f, "es", rng, style="structured")
    assert structured_es.startswith("HALLAZGOS:") and "CONCLUSIÓN:" in structured_es
    with pytest.raises(ConfigError, match="unknown report style"):
        write_report(f, "en", rng, style="telegrafic")


# --- dataset generation ----------------------------------------------------------------------


def _config(seed: int = 0, n: int = 12, dicom_fraction: float = 0.4) -> SynthConfig:
    return SynthConfig(
        seed=seed,
        image_size=64,
        dicom_fraction=dicom_fraction,
        sites=[SiteConfig("en-1", "en", n, "default"), SiteConfig("es-1", "es", n, "portable")],
    )


def _pixels(manifest: Path) -> dict[str, np.ndarray]:
    return {r.id: read_image(r.image_path)[0] for r in read_manifest(manifest)}


def test_generate_is_deterministic_whatever_the_worker_count(tmp_path: Path) -> None:
    a = generate(_config(), tmp_path / "a", progress=False, workers=1)
    b = generate(_config(), tmp_path / "b", progress=False, workers=2)
    c = generate(_config(seed=1), tmp_path / "c", progress=False)
    assert a.read_bytes() == b.read_bytes()
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert a.read_bytes() != c.read_bytes()
    assert any(not np.array_equal(pa[k], pc[k]) for k in pa if pa[k].shape == pc[k].shape)


def test_generate_writes_a_valid_manifest_with_splits_and_all_labels(tmp_path: Path) -> None:
    cfg = _config(n=20)
    records = read_manifest(generate(cfg, tmp_path, progress=False))
    assert len(records) == 40
    assert {r.lang for r in records if r.site == "es-1"} == {"es"}
    for site in ("en-1", "es-1"):
        splits = Counter(r.split for r in records if r.site == site)
        assert splits == {"test": 4, "val": 2, "train": 14}
        assert set(splits) <= set(SPLITS)
    for r in records:
        assert set(r.labels) == set(FINDINGS)
        assert Path(r.image_path).is_file()
        assert Path(r.image_path).parent == tmp_path / "images" / r.site
    first = (tmp_path / "manifest.jsonl").read_text().splitlines()[0]
    assert '"image_path": "images/' in first  # relative, so the folder can move


def test_generate_mixes_formats_that_readers_decode_identically(tmp_path: Path) -> None:
    cfg = _config(n=30, dicom_fraction=0.5)
    records = read_manifest(generate(cfg, tmp_path, progress=False))
    kinds = Counter()
    decoded = {}
    for r in records:
        arr, meta = read_image(r.image_path)
        if r.image_path.endswith(".dcm"):
            ds = pydicom.dcmread(r.image_path)
            assert ds.pixel_array.shape == (64, 64)
            kinds[str(ds.PhotometricInterpretation)] += 1
            kinds["rescaled"] += float(ds.RescaleSlope) != 1.0
        else:
            kinds[meta["mode"]] += 1
        decoded[r.id] = (arr - arr.min()) / max(1e-6, float(arr.max() - arr.min()))
    assert kinds["MONOCHROME1"] and kinds["MONOCHROME2"] and kinds["rescaled"]
    assert kinds["L"] and kinds["I;16"]
    # Every file decodes to the rendered film, whatever the format (up to 8-bit rounding).
    for r in records[::7]:
        s = 0 if r.site == "en-1" else 1
        r_find, r_img, _, _ = _record_rng(cfg.seed, s, int(r.id.rsplit("-", 1)[1])).spawn(4)
        profile = PROFILES[cfg.sites[s].profile]
        img = render_image(sample_findings(profile, r_find), profile, r_img, 64)
        ref = (img - img.min()) / (img.max() - img.min())
        assert np.abs(decoded[r.id] - ref).max() < 0.01, r.id


def test_a_site_of_both_languages_writes_half_of_its_reports_in_each(tmp_path: Path) -> None:
    """``mix-1:en+es``: one site (one profile), its records take the languages in turn, each
    report written in its row's language."""
    args = ["synth", "--no-progress", "--workers", "1", "--out", str(tmp_path), "synth.image_size=48"]
    assert main([*args, "--sites", "mix-1:es+en:8:default"]) == 0
    records = read_manifest(tmp_path / "manifest.jsonl")
    assert Counter(r.lang for r in records) == {"en": 4, "es": 4} and {r.site for r in records} == {"mix-1"}
    assert all(detect_language(r.report) in (r.lang, None) for r in records)


def test_validate_config_names_the_bad_site() -> None:
    cfg = _config()
    cfg.sites.append(SiteConfig("es-1", "es", 3, "default"))
    with pytest.raises(ConfigError, match=r"synth.sites\[2\] \(es-1\): duplicate"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="language 'fr'"):
        validate_config(SynthConfig(sites=[SiteConfig("fr-1", "fr", 3, "default")]))
    with pytest.raises(ConfigError, match="language 'en\+fr'"):
        validate_config(SynthConfig(sites=[SiteConfig("x-1", "en+fr", 3, "default")]))


# --- command line ----------------------------------------------------------------------------


def test_cli_synth_with_config_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    sites = "[{name: en-1, lang: en, n: 6, profile: default}, {name: es-1, lang: es, n: 4, profile: lowdose}]"
    args = ["synth", "--no-progress", "--workers", "1", f"synth.out={out}", f"synth.sites={sites}"]
    assert main([*args, "synth.image_size=48"]) == 0
    assert len(read_manifest(out / "manifest.jsonl")) == 10
    printed = capsys.readouterr().out
    assert "es-1" in printed and "pleural_effusion" in printed and "(normal)" in printed


def test_cli_synth_sites_flag_and_bad_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["synth", "--no-progress", "--workers", "1", "--out", str(tmp_path), "synth.image_size=48"]
    assert main([*args, "--sites", "en-1:en:3:highres,es-1:es:2"]) == 0
    assert Counter(r.site for r in read_manifest(tmp_path / "manifest.jsonl")) == {"en-1": 3, "es-1": 2}
    assert main([*args, "--sites", "en-1:en:3:portabel"]) == ConfigError.exit_code
    assert "did you mean 'portable'" in capsys.readouterr().err
