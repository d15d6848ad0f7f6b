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


def _to_model_input(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 1xSxS -> float32 3xSxS, grey repeated to 3 channels, (x/255 - mean) / std."""
    return ((x.to(torch.float32) / 255.0 - mean) / std).repeat(3, 1, 1)


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
    x = _as_image(img)
    top, left, h, w = sample_crop(x.shape[-2], x.shape[-1], scale, ratio, generator)
    x = F.resized_crop(x, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return _to_model_input(x, mean, std)


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

    Rotation and jitter are one affine warp, so the image is interpolated once.
    """
    x = _as_image(img)
    top, left, h, w = sample_crop(x.shape[-2], x.shape[-1], scale, ratio, generator)
    x = F.resized_crop(x, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    angle = _uniform(generator, -max_rotation, max_rotation)
    tx = _uniform(generator, -max_translate, max_translate) * size
    ty = _uniform(generator, -max_translate, max_translate) * size
    factor = _uniform(generator, *zoom)
    shear = _uniform(generator, -max_shear, max_shear)
    x = F.affine(x, angle=angle, translate=[tx, ty], scale=factor, shear=[shear, 0.0],
                 interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    x = F.autocontrast(x)
    return _to_model_input(x, mean, std)


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
    return _to_model_input(x, mean, std)


class TwoViewTransform:
    """Callable for a training dataset: cached uint8 HxW + generator -> (weak, strong)."""

    def __init__(
        self,
        size: int,
        mean: float = 0.5,
        std: float = 0.5,
        *,
        weak_scale: tuple[float, float] = WEAK_SCALE,
        strong_scale: tuple[float, float] = STRONG_SCALE,
    ) -> None:
        self.size = size
        self.mean = mean
        self.std = std
        self.weak_scale = weak_scale
        self.strong_scale = strong_scale

    def __call__(
        self, img: np.ndarray | torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views, each float32 3 x size x size; the weak one is drawn first."""
        weak = weak_view(img, self.size, generator, scale=self.weak_scale, mean=self.mean, std=self.std)
        strong = strong_view(img, self.size, generator, scale=self.strong_scale, mean=self.mean, std=self.std)
        return weak, strong

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std}, "
                f"weak_scale={self.weak_scale}, strong_scale={self.strong_scale})")
