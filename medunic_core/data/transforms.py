"""The random image views of Med-UniC (MEDUNIC.md, "Losses" and "Optimisation").

They run on the uint8 arrays from the image cache. All randomness comes from an explicit
``torch.Generator`` that the caller derives per (seed, epoch, sample), never from the
global RNG, so a resumed run draws exactly the views the interrupted one would have, and
DataLoader worker order cannot change them. Each view draws a fixed number of numbers.

No horizontal flip anywhere: it would swap left and right in a chest radiograph while the
report still says "left pleural effusion".
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# The paper resizes to 256 and crops 224; other sizes keep the same proportion.
PAPER_CROP_FRACTION = 224 / 256
# Weak view default: a plain random crop of that fraction (area fraction squared, square).
WEAK_SCALE = (PAPER_CROP_FRACTION**2, PAPER_CROP_FRACTION**2)
WEAK_RATIO = (1.0, 1.0)
STRONG_SCALE = (0.6, 1.0)
STRONG_RATIO = (3 / 4, 4 / 3)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _as_image(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HxW (numpy or torch) -> uint8 1xHxW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    if t.dtype != torch.uint8 or t.ndim != 2:
        raise ValueError(f"views expect a uint8 HxW cached image, got {t.dtype} with shape {tuple(t.shape)}")
    return t.unsqueeze(0)


def to_model_input(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [B x] 1 x S x S -> float32 [B x] 3 x S x S: grey repeated to 3 channels,
    (x/255 - mean) / std. Elementwise, so a batch gives each image's values exactly."""
    x = (x.to(torch.float32) / 255.0 - mean) / std
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Draw ``(top, left, h, w)`` covering a ``scale`` fraction of the area with aspect ``ratio``.

    Unlike torchvision's retry loop this clamps an oversized box to the image, so it
    always consumes exactly four draws.
    """
    area = height * width * _uniform(generator, *scale)
    aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    return top, left, h, w


def random_resized_crop(
    img: np.ndarray | torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """uint8 HxW -> uint8 1 x size x size: a :func:`sample_crop` box resized (antialiased)."""
    x = _as_image(img)
    top, left, h, w = sample_crop(x.shape[-2], x.shape[-1], scale, ratio, generator)
    return F.resized_crop(x, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)


def sample_jitter(
    size: int,
    generator: torch.Generator,
    *,
    max_rotation: float = 90.0,
    max_translate: float = 0.1,
    zoom: tuple[float, float] = (0.9, 1.1),
    max_shear: float = 10.0,
) -> list[float]:
    """Draw the strong view's affine jitter (five draws: rotation, translation x and y as a
    fraction of ``size``, zoom, shear along x) and return it as the 2x3 matrix that maps
    output to input pixel offsets from the centre (``[a, b, tx, c, d, ty]``, row-major).

    The forward map is translate . rotate . zoom . shear_x (torchvision's ``affine`` with
    the centre as origin); warping needs its inverse.
    """
    angle = math.radians(_uniform(generator, -max_rotation, max_rotation))
    tx = _uniform(generator, -max_translate, max_translate) * size
    ty = _uniform(generator, -max_translate, max_translate) * size
    factor = _uniform(generator, *zoom)
    tan_shear = math.tan(math.radians(_uniform(generator, -max_shear, max_shear)))
    cos, sin = math.cos(angle), math.sin(angle)
    # rotate . shear_x = [[cos, -(cos*tan + sin)], [sin, cos - sin*tan]], determinant 1,
    # so its inverse is the adjugate; divide by the zoom and undo the translation.
    a, b = (cos - sin * tan_shear) / factor, (cos * tan_shear + sin) / factor
    c, d = -sin / factor, cos / factor
    return [a, b, -a * tx - b * ty, c, d, -c * tx - d * ty]


def warp(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp of uint8 B x C x S x S images, each by its own inverse matrix
    (B x 6 from :func:`sample_jitter`), zeros outside, in one ``grid_sample`` call.

    Pixels that the warp pulls partly from outside the image are faded toward the fill by
    the share of their footprint that lies outside (a warped all-ones mask): torchvision's
    ``affine`` with ``fill=0`` does the same, per image (tests check it matches exactly).
    """
    b, c, h, w = x.shape
    theta = matrices.to(torch.float32).reshape(b, 2, 3)
    # Pixel centres as offsets from the image centre, then to grid_sample's [-1, 1] units.
    base = torch.empty(1, h, w, 3)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h]))
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    src = torch.cat((x.to(torch.float32), torch.ones(b, 1, h, w)), dim=1)
    out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, inside = out[:, :c], out[:, c:]
    return img.mul_(inside).round_().to(torch.uint8)


def weak_view(
    img: np.ndarray | torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = WEAK_SCALE,
    ratio: tuple[float, float] = WEAK_RATIO,
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """x1 of the SSV loss: a random crop resized to ``size``; float32 3 x size x size.

    With the defaults and a 256 cache this is the paper's random 224 crop of 256.
    """
    return to_model_input(random_resized_crop(img, size, generator, scale, ratio), mean, std)


def strong_view(
    img: np.ndarray | torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = STRONG_SCALE,
    ratio: tuple[float, float] = STRONG_RATIO,
    max_rotation: float = 90.0,
    max_translate: float = 0.1,
    zoom: tuple[float, float] = (0.9, 1.1),
    max_shear: float = 10.0,
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """x2 of the SSV loss: crop, rotation up to ``max_rotation`` degrees, affine jitter
    (translation as a fraction of ``size``, zoom, shear in degrees) and autocontrast;
    float32 3 x size x size.

    Rotation and jitter are one affine warp, so the image is interpolated once. This is
    :class:`TwoViewTransform`'s batched path for a batch of one.
    """
    x = random_resized_crop(img, size, generator, scale, ratio)
    m = sample_jitter(size, generator, max_rotation=max_rotation, max_translate=max_translate, zoom=zoom,
                      max_shear=max_shear)
    return _finish_strong(x[None], torch.tensor([m], dtype=torch.float64), mean, std)[0]


def _finish_strong(crops: torch.Tensor, matrices: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The strong view's batched part: warp, autocontrast (per image), normalisation."""
    return to_model_input(F.autocontrast(warp(crops, matrices)), mean, std)


def eval_transform(
    img: np.ndarray | torch.Tensor,
    size: int,
    mean: float = 0.5,
    std: float = 0.5,
    *,
    crop_fraction: float = PAPER_CROP_FRACTION,
) -> torch.Tensor:
    """Deterministic view for evaluation and embedding export: resize the shorter side to
    ``size / crop_fraction`` and take the centre ``size`` crop (256 -> 224 by default);
    float32 3 x size x size."""
    x = _as_image(img)
    short = round(size / crop_fraction)
    if min(x.shape[-2:]) != short:
        x = F.resize(x, [short], InterpolationMode.BILINEAR, antialias=True)
    x = F.center_crop(x, [size, size])
    return to_model_input(x, mean, std)


class TwoViewTransform:
    """The two training views of a cached uint8 HxW image, in two stages so that a batch
    pays the costly part once: :meth:`draw` per sample (every random draw, the crops) in
    the dataset, :meth:`finish` per batch (warp, autocontrast, normalisation) in the
    collator. ``transform(img, generator)`` does both for one image.

    With ``strong=False`` only the weak view is made (the strong one is None): a run
    without L_SSV pays for no view it does not use. The weak view is the same either way,
    because it is drawn first from the sample's own generator."""

    def __init__(
        self,
        size: int,
        mean: float = 0.5,
        std: float = 0.5,
        *,
        weak_scale: tuple[float, float] = WEAK_SCALE,
        strong_scale: tuple[float, float] = STRONG_SCALE,
        strong: bool = True,
    ) -> None:
        self.size = size
        self.strong = strong
        self.mean = mean
        self.std = std
        self.weak_scale = weak_scale
        self.strong_scale = strong_scale

    def draw(self, img: np.ndarray | torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One sample's part: the weak crop, the strong crop and its jitter matrix, drawn in
        that order (the order :func:`weak_view` then :func:`strong_view` draw in)."""
        weak = random_resized_crop(img, self.size, generator, self.weak_scale, WEAK_RATIO)
        if not self.strong:
            return {"image": weak}
        strong = random_resized_crop(img, self.size, generator, self.strong_scale, STRONG_RATIO)
        jitter = torch.tensor(sample_jitter(self.size, generator), dtype=torch.float64)
        return {"image": weak, "image_strong": strong, "jitter": jitter}

    def finish(self, drawn: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch's part, on :meth:`draw`'s outputs stacked (B x 1 x S x S crops, B x 6
        matrices): both views as float32 B x 3 x S x S, each image's values exactly those
        of :func:`weak_view` and :func:`strong_view` (None without the strong view)."""
        weak = to_model_input(drawn["image"], self.mean, self.std)
        if not self.strong:
            return weak, None
        return weak, _finish_strong(drawn["image_strong"], drawn["jitter"], self.mean, self.std)

    def __call__(
        self, img: np.ndarray | torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Both views of one image, each float32 3 x size x size; the weak one is drawn first."""
        weak, strong = self.finish({k: v[None] for k, v in self.draw(img, generator).items()})
        return weak[0], None if strong is None else strong[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std}, "
                f"weak_scale={self.weak_scale}, strong_scale={self.strong_scale}, strong={self.strong})")
