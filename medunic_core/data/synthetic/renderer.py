"""Chest-film-like synthetic radiographs whose findings are visible by construction.

Everything is drawn with vectorised numpy on a coordinate grid in *patient* coordinates
(u across, v down, both about -1..1), so a per-image rotation, shift and magnification is
just a transform of that grid. Radiological convention: the patient's right is on the
image's left (u < 0). A finding only changes the picture through the anatomy it would
change on a real film (a larger heart shadow, fluid replacing lung air, a collapsed lung
with no markings beyond its edge...), so a model that learns it learns the right cue.

Each part of the picture draws from its own child generator (anatomy, texture, vessels,
each finding, acquisition), so adding or removing a finding leaves the rest of the image
unchanged: the same ``rng`` state with and without a finding differs only by the finding.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Optional

import numpy as np
from PIL import Image

from medunic_core.constants import FINDINGS
from medunic_core.errors import ConfigError

SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
# Sides each finding can take, the default first: a heart has none, edema is bilateral.
LATERALITY: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("none",),
    "pleural_effusion": ("right", "left", "bilateral"),
    "pneumothorax": ("right", "left"),
    "consolidation": ("right", "left", "bilateral"),
    "nodule": ("right", "left"),
    "edema": ("bilateral",),
}
# Findings placed in a lung zone (the report names the lobe), with their default zone.
ZONED: dict[str, str] = {"consolidation": "lower", "nodule": "upper"}


@dataclass(frozen=True)
class Finding:
    """One positive finding: where it is and how much of it there is.

    ``uncertain`` only changes the wording of the report ("possible ..."); the label stays 1.
    It is allowed for mild findings only, the cases a radiologist would hedge on.
    """

    name: str
    laterality: Optional[str] = None  # None: the finding's default side
    severity: str = "moderate"
    zone: Optional[str] = None  # consolidation and nodule only; None: default zone
    uncertain: bool = False

    def __post_init__(self) -> None:
        if self.name not in LATERALITY:
            raise ValueError(f"unknown finding {self.name!r}; expected one of {list(FINDINGS)}")
        sides = LATERALITY[self.name]
        if self.laterality is None:
            object.__setattr__(self, "laterality", sides[0])
        elif self.laterality not in sides:
            raise ValueError(f"{self.name} cannot be {self.laterality!r}; expected one of {list(sides)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"{self.name}: severity {self.severity!r} not in {list(SEVERITIES)}")
        if self.name in ZONED:
            zone = self.zone or ZONED[self.name]
            if zone not in ZONES or (zone == "middle" and self.laterality == "bilateral"):
                raise ValueError(f"{self.name} ({self.laterality}): zone {zone!r} not possible")
            object.__setattr__(self, "zone", zone)
        elif self.zone is not None:
            raise ValueError(f"{self.name} has no zone, got {self.zone!r}")
        if self.uncertain and self.severity != "mild":
            raise ValueError(f"{self.name}: only mild findings can be uncertain, got {self.severity}")

    @property
    def sides(self) -> tuple[int, ...]:
        """Signs of u for the affected sides: -1 patient right (image left), +1 left."""
        return {"right": (-1,), "left": (1,), "bilateral": (-1, 1), "none": ()}[self.laterality]


@dataclass(frozen=True)
class Profile:
    """How one site acquires its films, and which patients it sees (non-IID sites)."""

    name: str
    contrast: float = 1.0  # scale of intensities about mid-grey
    brightness: float = 0.0  # added after contrast
    noise: float = 0.012  # quantum-like noise, std at full brightness
    resolution: float = 1.0  # fraction of the output size the detector resolves
    sharpen: float = 0.0  # unsharp-mask amount (edge-enhanced processing)
    rotation_deg: float = 2.0  # largest patient rotation
    shift: float = 0.03  # largest patient offset, in half-image units
    magnification: float = 1.0  # AP films put the chest closer to the source
    marker: bool = False  # a bright side marker in a corner, as portable films have
    prevalence: Mapping[str, float] = field(default_factory=dict)  # finding -> P(present)


BASE_PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.18,
    "pleural_effusion": 0.18,
    "pneumothorax": 0.10,
    "consolidation": 0.15,
    "nodule": 0.12,
    "edema": 0.12,
}

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("default", prevalence=BASE_PREVALENCE),
        # Bedside ICU films: flat, noisy, tilted, soft; sicker patients.
        Profile(
            "portable",
            contrast=0.72,
            brightness=0.06,
            noise=0.03,
            resolution=0.5,
            rotation_deg=7.0,
            shift=0.08,
            magnification=1.06,
            marker=True,
            prevalence={
                "cardiomegaly": 0.20,
                "pleural_effusion": 0.25,
                "pneumothorax": 0.13,
                "consolidation": 0.18,
                "nodule": 0.06,
                "edema": 0.18,
            },
        ),
        # Outpatient department with a modern detector: crisp, low noise, screening population.
        Profile(
            "highres",
            contrast=1.12,
            noise=0.006,
            sharpen=0.6,
            rotation_deg=1.0,
            shift=0.02,
            prevalence={
                "cardiomegaly": 0.16,
                "pleural_effusion": 0.14,
                "pneumothorax": 0.09,
                "consolidation": 0.14,
                "nodule": 0.25,
                "edema": 0.10,
            },
        ),
        # Reduced dose: grainy and a little dark.
        Profile("lowdose", contrast=0.9, brightness=-0.05, noise=0.05, prevalence=BASE_PREVALENCE),
    )
}


def get_profile(name: str) -> Profile:
    """The named acquisition profile; a typo fails with the list of profiles that exist."""
    if name in PROFILES:
        return PROFILES[name]
    close = difflib.get_close_matches(name, list(PROFILES), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown synthetic profile '{name}'; {hint}available: {', '.join(PROFILES)}")


# --- small vectorised helpers -------------------------------------------------------------


@lru_cache(maxsize=8)
def _base_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in -1..1 (x across, y down), shared read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - np.float32(1.0)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _uniform(rng: np.random.Generator) -> float:
    """A plain-float draw in [-1, 1]: numpy float64 scalars would upcast the float32 maps."""
    return float(rng.uniform(-1.0, 1.0))


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 for x <= 0 rising linearly to 1 at x >= width: an anti-aliased inside test."""
    return np.clip(x * (1.0 / width), 0.0, 1.0)


def _box_blur_axis(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    if axis == 0:
        return (c[2 * r + 1 : 2 * r + 1 + n] - c[:n]) * np.float32(1.0 / (2 * r + 1))
    return (c[:, 2 * r + 1 : 2 * r + 1 + n] - c[:, :n]) * np.float32(1.0 / (2 * r + 1))


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur (two box passes per axis), O(pixels) whatever sigma."""
    if sigma < 0.3:
        return a
    r = max(1, int(round((math.sqrt(6.0 * sigma * sigma + 1.0) - 1.0) / 2.0)))
    for axis in (0, 1):
        a = _box_blur_axis(_box_blur_axis(a, r, axis), r, axis)
    return a


def _resize(a: np.ndarray, size: int, resample: int = Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((size, size), resample))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish, low-frequency noise: a coarse random grid upsampled bicubically."""
    return _resize(rng.standard_normal((cells, cells)).astype(np.float32), size, Image.BICUBIC)


def _segment_distance(
    u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) * (1.0 / (du * du + dv * dv)), 0.0, 1.0)
    return np.hypot(u - (a[0] + t * du), v - (a[1] + t * dv))


# --- anatomy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chest:
    """Per-image anatomy in patient coordinates, drawn once from the anatomy generator."""

    lung_cx: float  # centre of each lung, distance from the midline
    lung_cy: float  # level where the rounded apex meets the straight lateral wall
    lung_a: float  # lung half-width
    lung_b: float  # apex height above lung_cy
    dome: tuple[float, float]  # top of the right and left hemidiaphragm (v)
    heart_cu: float
    heart_cv: float
    heart_hh: float
    ctr: float  # cardiothoracic ratio of this patient's normal heart
    rib_v0: float
    rib_span: float
    body_w: float

    @property
    def hemithorax(self) -> float:
        """Half of the internal thoracic width (at the bases), the CTR denominator."""
        return self.lung_cx + 1.12 * self.lung_a


def _sample_chest(rng: np.random.Generator) -> _Chest:
    j = [float(x) for x in rng.uniform(-1.0, 1.0, size=13)]
    right_dome = 0.38 + 0.04 * j[4]
    return _Chest(
        lung_cx=0.40 + 0.02 * j[0],
        lung_cy=-0.10 + 0.03 * j[1],
        lung_a=0.28 + 0.02 * j[2],
        lung_b=0.62 + 0.04 * j[3],
        dome=(right_dome, right_dome + 0.04 + 0.02 * j[5]),
        heart_cu=0.08 + 0.02 * j[6],
        heart_cv=0.30 + 0.03 * j[7],
        heart_hh=0.30 + 0.02 * j[8],
        ctr=0.41 + 0.025 * j[9],
        rib_v0=-0.74 + 0.03 * j[10],
        rib_span=1.15 + 0.05 * j[11],
        body_w=1.0 + 0.04 * j[12],
    )


# CTR of an enlarged heart by severity; a normal heart is drawn at 0.385..0.435.
CARDIOMEGALY_CTR: dict[str, float] = {"mild": 0.56, "moderate": 0.62, "severe": 0.69}


def _heart_e(u: np.ndarray, v: np.ndarray, chest: _Chest, ctr: float) -> np.ndarray:
    """Normalised radius of the heart shadow, whose full width is ``ctr`` of the thorax.

    A half-ellipse on top of a taller one: the widest part sits just above the diaphragm.
    """
    extra = max(0.0, ctr - chest.ctr)
    hw = ctr * chest.hemithorax
    cu = chest.heart_cu + 0.3 * extra  # an enlarged ventricle grows towards the left
    cv = chest.heart_cv + 0.2 * extra
    hh = chest.heart_hh * (1.0 + 0.6 * extra)
    dv = (v - cv) * np.where(v < cv, np.float32(1.0 / hh), np.float32(1.0 / (1.4 * hh)))
    return ((u - cu) * (1.0 / hw)) ** 2 + dv * dv


def _mediastinum(v: np.ndarray, side: int) -> np.ndarray:
    """Half-width of the upper mediastinum on one side, with the aortic knob on the left."""
    w = 0.10 + 0.03 * np.clip(v + 0.5, 0.0, 1.0)
    if side > 0:
        w = w + 0.07 * np.exp(-(((v + 0.36) * (1 / 0.08)) ** 2))
    return w


def _dome(p: np.ndarray, chest: _Chest, side: int) -> np.ndarray:
    """Hemidiaphragm outline (v) against the distance p from the midline."""
    return chest.dome[0 if side < 0 else 1] + 1.6 * (p - 0.33) ** 2


def _costophrenic_v(chest: _Chest, side: int) -> float:
    """Level of the costophrenic angle, where the dome meets the lateral chest wall."""
    return chest.dome[0 if side < 0 else 1] + 1.6 * (chest.hemithorax - 0.33) ** 2


def _lung_e(p: np.ndarray, v: np.ndarray, chest: _Chest) -> np.ndarray:
    """Normalised radius of the lung: a rounded apex over a slowly widening lateral wall."""
    dv = v - chest.lung_cy
    a = chest.lung_a * (1.0 + 0.12 * np.clip(dv * 2.0, 0.0, 1.0))
    top = np.minimum(dv, 0.0) * (1.0 / chest.lung_b)
    return ((p - chest.lung_cx) / a) ** 2 + top * top


def _vessel_points(
    rng: np.random.Generator, side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (u, v, weight) along a branching vessel tree fanning out from one hilum."""
    n0 = 6
    ang = np.linspace(-1.9, 1.2, n0) + rng.uniform(-0.15, 0.15, n0)
    start = np.stack([np.full(n0, 0.17), np.linspace(-0.14, 0.06, n0)], axis=1)
    length = 0.17 * rng.uniform(0.8, 1.2, n0)
    weight = np.ones(n0)
    us, vs, ws = [], [], []
    t = np.linspace(0.0, 1.0, 10)[None, :]
    for _ in range(4):
        end = start + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        pts = start[:, None, :] + t[..., None] * (end - start)[:, None, :]
        us.append(side * pts[..., 0].ravel())
        vs.append(pts[..., 1].ravel())
        ws.append(np.repeat(weight, t.shape[1]))
        k = len(ang)
        spread = rng.uniform(0.25, 0.5, k)
        ang = np.concatenate([ang - spread, ang + spread * rng.uniform(0.6, 1.0, k)])
        start = np.concatenate([end, end])
        length = np.concatenate([length, length]) * rng.uniform(0.65, 0.85, 2 * k)
        weight = np.concatenate([weight, weight]) * 0.7
    return np.concatenate(us), np.concatenate(vs), np.concatenate(ws)


@dataclass(frozen=True)
class _Pose:
    """Patient placement: image (x, y) = scale * R(theta) (u, v) + (dx, dy)."""

    cos: float
    sin: float
    scale: float
    dx: float
    dy: float

    def to_patient(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = _base_grid(size)
        xs, ys = x - np.float32(self.dx), y - np.float32(self.dy)
        k = 1.0 / self.scale
        return (self.cos * xs + self.sin * ys) * k, (self.cos * ys - self.sin * xs) * k

    def splat(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
        """Accumulate weighted patient-coordinate points into an image (nearest pixel)."""
        x = self.scale * (self.cos * u - self.sin * v) + self.dx
        y = self.scale * (self.sin * u + self.cos * v) + self.dy
        col = np.floor((x + 1.0) * 0.5 * size).astype(np.int64)
        row = np.floor((y + 1.0) * 0.5 * size).astype(np.int64)
        ok = (col >= 0) & (col < size) & (row >= 0) & (row < size)
        flat = np.bincount(row[ok] * size + col[ok], weights=w[ok], minlength=size * size)
        return flat.reshape(size, size).astype(np.float32)


# --- rendering ------------------------------------------------------------------------------

SIDES = (-1, 1)  # sign of u: patient right (image left), patient left (image right)


def render_image(
    findings: Mapping[str, Finding],
    profile: Profile | str,
    rng: np.random.Generator,
    size: int = 256,
) -> np.ndarray:
    """Render one frontal chest film: float32 ``(size, size)`` in 0..1, bright = dense.

    ``findings`` maps a finding name to its :class:`Finding` (absent names are normal).
    ``rng`` is only used through ``rng.spawn`` (one child per part of the picture), so two
    generators with the same seed give the same film apart from the findings; spawning
    advances ``rng``, so calling again with the same object gives another patient.
    The anatomy is drawn at half resolution above 128 px (it is smooth) and upsampled;
    noise and detector effects are applied at full resolution.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    for name, f in findings.items():
        if name != f.name:
            raise ValueError(f"findings key {name!r} holds a Finding for {f.name!r}")
    r_anat, r_pose, r_tex, r_vessel, r_acq, *r_find = rng.spawn(5 + len(FINDINGS))
    chest = _sample_chest(r_anat)
    theta = math.radians(prof.rotation_deg) * _uniform(r_pose)
    pose = _Pose(
        cos=math.cos(theta),
        sin=math.sin(theta),
        scale=prof.magnification * (1.0 + 0.04 * _uniform(r_pose)),
        dx=prof.shift * _uniform(r_pose),
        dy=prof.shift * _uniform(r_pose),
    )
    work = size // 2 if size >= 128 else size
    img = _draw(findings, chest, pose, r_tex, r_vessel, dict(zip(FINDINGS, r_find)), work)
    if work != size:
        img = _resize(img, size, Image.BICUBIC)
    return _acquire(img, prof, r_acq, size)


def _draw(
    findings: Mapping[str, Finding],
    chest: _Chest,
    pose: _Pose,
    r_tex: np.random.Generator,
    r_vessel: np.random.Generator,
    frng: dict[str, np.random.Generator],
    n: int,
) -> np.ndarray:
    """The film before the detector: float32 ``(n, n)``, roughly 0..1."""
    u, v = pose.to_patient(n)
    au = np.abs(u)
    px = 2.0 / (n * pose.scale)  # one pixel in patient units, for anti-aliasing widths
    sig = n / 256.0  # blur sigmas below are given in pixels of a 256 px film

    # Soft tissue: an elliptic trunk, thicker in the middle, with neck and sloping shoulders.
    trunk = np.sqrt(np.clip(1.0 - (u / (chest.body_w + 0.05 * v)) ** 2, 0.0, 1.0))
    shoulder = -0.84 + 0.8 * np.clip(au - 0.2, 0.0, None) ** 2
    body = trunk * np.maximum(_ramp(v - shoulder, 0.08), _ramp(0.19 - au, 3 * px))
    density = 0.64 * np.sqrt(body)

    # Heart shadow: its size is the cardiomegaly finding.
    card = findings.get("cardiomegaly")
    ctr = chest.ctr
    if card is not None:
        ctr = CARDIOMEGALY_CTR[card.severity] + 0.015 * _uniform(frng["cardiomegaly"])
    heart = _ramp(1.0 - _heart_e(u, v, chest, ctr), 0.05)

    lungs: dict[int, np.ndarray] = {}
    lung_e: dict[int, np.ndarray] = {}
    for side in SIDES:
        p = side * u
        e = _lung_e(p, v, chest)
        lung_e[side] = e
        lungs[side] = (
            _ramp(1.0 - e, 0.05)
            * _ramp(p - _mediastinum(v, side), 2 * px)
            * _ramp(_dome(p, chest, side) - v, 2 * px)
            * (1.0 - heart)
        )

    # Vessel markings: branching trees from the hila (drawn before the findings hide them).
    edema = findings.get("edema")
    edema_sev = {"mild": 0.45, "moderate": 0.7, "severe": 1.0}[edema.severity] if edema else 0.0
    trees = {}
    for side in SIDES:
        vu, vv, vw = _vessel_points(r_vessel, side)
        # Edema makes vessel outlines indistinct.
        tree = _blur(pose.splat(vu, vv, vw, n), (0.8 + 0.8 * edema_sev) * sig) * (4.0 / sig)
        trees[side] = 1.0 - np.exp(-tree)

    air_gain = {side: np.ones_like(u) for side in SIDES}  # 1 = normally aerated lung
    vessel_mask = dict(lungs)
    extra = np.zeros_like(u)

    # Pneumothorax: the lung collapses towards the hilum; beyond its edge, air and no markings.
    ptx = findings.get("pneumothorax")
    if ptx is not None:
        g = frng["pneumothorax"]
        k = {"mild": 0.8, "moderate": 0.66, "severe": 0.5}[ptx.severity] + 0.03 * _uniform(g)
        for side in ptx.sides:
            p = side * u
            hp, hv = 0.22, 0.30  # anchored low and medial: the apex and lateral edge fall most
            collapsed = _ramp(1.0 - _lung_e(hp + (p - hp) / k, hv + (v - hv) / k, chest), 0.03) * lungs[side]
            space = np.clip(lungs[side] - collapsed, 0.0, 1.0)
            edge = _blur(collapsed, 0.8 * sig)
            extra += 0.18 * np.clip(4.0 * edge * (1.0 - edge), 0.0, 1.0) * lungs[side]
            air_gain[side] = air_gain[side] + 0.35 * space - 0.12 * collapsed
            vessel_mask[side] = collapsed

    # Pleural effusion: fluid fills the base with a meniscus rising along the lateral wall.
    eff = findings.get("pleural_effusion")
    if eff is not None:
        g = frng["pleural_effusion"]
        h = {"mild": 0.28, "moderate": 0.42, "severe": 0.64}[eff.severity]
        for side in eff.sides:
            p = side * u
            hs = h * (1.0 + 0.1 * _uniform(g))
            lateral = np.clip((p - 0.12) * (1.0 / (chest.hemithorax - 0.12)), 0.0, 1.0)
            surface = _costophrenic_v(chest, side) - hs * (0.55 + 0.45 * lateral * lateral)
            fluid = _ramp(v - surface, 0.06)
            air_gain[side] = air_gain[side] * (1.0 - fluid)
            vessel_mask[side] = vessel_mask[side] * (1.0 - fluid)

    # Consolidation: a patchy lobar opacity, sharp against a fissure, with air bronchograms.
    con = findings.get("consolidation")
    if con is not None:
        g = frng["consolidation"]
        sev = {"mild": 0.5, "moderate": 0.75, "severe": 1.0}[con.severity]
        ragged = _smooth_noise(g, n, 12)
        patchy = _smooth_noise(g, n, 28)
        fissure = -0.14 + 0.03 * _uniform(g)
        for side in con.sides:
            p = side * u
            if con.zone == "upper":
                band, cv = _ramp(fissure - v, 2 * px), -0.38
            elif con.zone == "middle":
                band, cv = _ramp(v - fissure, 2 * px) * _ramp(0.32 - v, 0.1), 0.08
            else:
                band, cv = _ramp(v - 0.0, 0.15), 0.36
            cp = chest.lung_cx - 0.04 + 0.05 * _uniform(g)
            ru, rv = 0.14 + 0.24 * sev, 0.12 + 0.22 * sev
            patch = ((p - cp) / ru) ** 2 + ((v - cv - 0.03 * _uniform(g)) / rv) ** 2 + 0.2 * ragged
            opac = _ramp(1.0 - patch, 0.3) * band * np.clip(0.9 + 0.2 * patchy, 0.0, 1.0)
            bronchi = np.clip(trees[side] * 0.5, 0.0, 0.3) * opac
            air_gain[side] = air_gain[side] * (1.0 - (0.85 + 0.15 * sev) * opac) + bronchi
            extra += 0.08 * opac * lungs[side]
            vessel_mask[side] = vessel_mask[side] * (1.0 - opac)

    # Nodule: a round, well-defined opacity.
    nod = findings.get("nodule")
    if nod is not None:
        g = frng["nodule"]
        radius = {"mild": 0.075, "moderate": 0.095, "severe": 0.12}[nod.severity] * (1.0 + 0.1 * _uniform(g))
        side = nod.sides[0]
        zone_v = {"upper": -0.42, "middle": -0.08, "lower": 0.20}[nod.zone]
        cp = chest.lung_cx + 0.06 * _uniform(g) + 0.02
        cv = zone_v + 0.05 * _uniform(g)
        d = np.hypot(side * u - cp, v - cv) * (1.0 / radius)
        disc = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0)) * _ramp(1.0 - d, 0.15)
        extra += 0.36 * disc * lungs[side]

    # Edema: bilateral perihilar "bat-wing" haze, densest at the hila, sparing the periphery.
    if edema is not None:
        patch = 1.0 + 0.3 * _smooth_noise(frng["edema"], n, 10)
        for side in SIDES:
            d2 = ((side * u - 0.18) / (0.22 + 0.14 * edema_sev)) ** 2 + (v / (0.30 + 0.16 * edema_sev)) ** 2
            haze = np.clip(np.exp(-d2) * (0.45 + 0.5 * edema_sev) * patch, 0.0, 0.95)
            air_gain[side] = air_gain[side] * (1.0 - haze)

    # Lung air: darkest where the lung is thickest; fine parenchymal texture.
    texture = 1.0 + 0.08 * _smooth_noise(r_tex, n, 20)
    air = np.zeros_like(u)
    vessels = np.zeros_like(u)
    for side in SIDES:
        depth = np.sqrt(np.clip(1.0 - lung_e[side], 0.0, 1.0))
        air += 0.46 * lungs[side] * (0.6 + 0.4 * depth) * texture * air_gain[side]
        vessels += trees[side] * vessel_mask[side]
    for side in SIDES:
        extra += 0.05 * np.exp(-(((u - 0.17 * side) * (1 / 0.06)) ** 2 + ((v + 0.04) * (1 / 0.09)) ** 2))
    extra += 0.10 * vessels
    # Trachea and the gastric bubble under the left hemidiaphragm.
    air += 0.09 * _ramp(0.035 - np.abs(u - 0.01), 2 * px) * _ramp(-0.12 - v, 0.1)
    bubble = ((u - 0.36) * (1 / 0.10)) ** 2 + ((v - chest.dome[1] - 0.13) * (1 / 0.05)) ** 2
    air += 0.16 * _ramp(1.0 - bubble, 0.3) * body

    # Bones: posterior and anterior ribs, clavicles and the spine behind the mediastinum.
    in_thorax = _ramp(1.1 - np.minimum(lung_e[-1], lung_e[1]), 0.2) * _ramp(chest.dome[0] + 0.1 - v, 0.2) * body
    curve = -0.22 * au + 0.75 * au * au
    t = np.clip(v - curve - chest.rib_v0, 0.0, None) * (1.0 / chest.rib_span)
    phase = 10.0 * t**0.8
    f = phase - np.floor(phase)
    rib = np.sqrt(np.maximum(np.sin(np.pi * np.clip(f * (1 / 0.42), 0.0, 1.0)), 0.0))
    rib *= (phase > 0) & (phase < 10.0)
    ta = np.clip(v + 0.5 * au - chest.rib_v0 - 0.05, 0.0, None) * (7.0 / chest.rib_span)
    fa = ta - np.floor(ta)
    ant = np.sin(np.pi * np.clip(fa * (1 / 0.35), 0.0, 1.0)) * _ramp(au - 0.3, 0.15) * (ta < 7.0)
    bones = (0.06 * rib + 0.025 * ant) * in_thorax
    for side in SIDES:
        d = _segment_distance(u, v, (0.05 * side, -0.58), (0.62 * side, -0.77)) * (1 / 0.035)
        bones += 0.13 * np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
    bones += 0.035 * _ramp(0.075 - au, 0.02) * (0.7 + 0.3 * np.cos(np.pi * 9.0 * v) ** 2) * body

    img = np.clip(density - air + extra + bones, 0.0, None)
    return img.astype(np.float32)


def _acquire(img: np.ndarray, prof: Profile, rng: np.random.Generator, size: int) -> np.ndarray:
    """Detector and processing: contrast, brightness, sharpening, resolution, noise, marker."""
    contrast = prof.contrast * (1.0 + 0.05 * _uniform(rng))
    img = (img - 0.42) * (1.3 * contrast) + (0.5 + prof.brightness + 0.03 * _uniform(rng))
    if prof.sharpen:
        img = img + prof.sharpen * (img - _blur(img, 1.5 * size / 256))
    if prof.resolution < 1.0:
        low = max(8, int(round(size * prof.resolution)))
        img = _resize(_resize(img, low, Image.BOX), size, Image.BICUBIC)
    grain = rng.standard_normal(img.shape, dtype=np.float32)
    img = img + prof.noise * np.sqrt(np.clip(img, 0.0, 1.0) + 0.05) * grain
    if prof.marker:
        m = max(1, size // 32)
        r0, c0 = 2 * m, size - 5 * m
        img[r0 : r0 + 3 * m, c0 : c0 + m] = 0.95
        img[r0 + 2 * m : r0 + 3 * m, c0 : c0 + 2 * m] = 0.95
    return np.clip(img, 0.0, 1.0).astype(np.float32)
