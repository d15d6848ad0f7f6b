"""Random views are a pure function of (image, generator) and never touch the global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medunic_core.data.transforms import (
    STRONG_RATIO,
    STRONG_SCALE,
    TwoViewTransform,
    eval_transform,
    random_resized_crop,
    sample_crop,
    strong_view,
    to_model_input,
    warp,
    weak_view,
)


@pytest.fixture
def img() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(64, 64), dtype=np.uint8)


def test_two_view_transform_same_seed_gives_identical_views(img: np.ndarray) -> None:
    t = TwoViewTransform(56)
    w1, s1 = t(img, torch.Generator().manual_seed(7))
    w2, s2 = t(img, torch.Generator().manual_seed(7))
    assert torch.equal(w1, w2) and torch.equal(s1, s2)


def test_without_the_strong_view_the_weak_view_is_unchanged(img: np.ndarray) -> None:
    both = TwoViewTransform(56)(img, torch.Generator().manual_seed(7))
    weak, strong = TwoViewTransform(56, strong=False)(img, torch.Generator().manual_seed(7))
    assert strong is None and torch.equal(weak, both[0])


def test_two_view_transform_different_seeds_differ(img: np.ndarray) -> None:
    t = TwoViewTransform(56)
    w1, s1 = t(img, torch.Generator().manual_seed(1))
    w2, s2 = t(img, torch.Generator().manual_seed(2))
    assert not torch.equal(w1, w2) and not torch.equal(s1, s2)
    assert not torch.equal(w1, s1)


def test_views_shape_dtype_and_normalisation(img: np.ndarray) -> None:
    g = torch.Generator().manual_seed(0)
    for view in (weak_view(img, 32, g), strong_view(img, 32, g), eval_transform(img, 32)):
        assert view.shape == (3, 32, 32) and view.dtype == torch.float32
        assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])
        assert view.min() >= -1.0 and view.max() <= 1.0
    out = eval_transform(np.full((8, 8), 255, np.uint8), 8, mean=0.25, std=0.5, crop_fraction=1.0)
    assert torch.allclose(out, torch.full((3, 8, 8), 1.5))


def test_weak_view_defaults_are_the_papers_random_crop() -> None:
    img = np.arange(256 * 256, dtype=np.int64).reshape(256, 256) % 251
    img = img.astype(np.uint8)
    g = torch.Generator().manual_seed(3)
    top, left, h, w = sample_crop(256, 256, (224**2 / 256**2,) * 2, (1.0, 1.0), torch.Generator().manual_seed(3))
    assert (h, w) == (224, 224)
    view = weak_view(img, 224, g)
    expected = (torch.from_numpy(img[top : top + 224, left : left + 224]).float() / 255 - 0.5) / 0.5
    assert torch.allclose(view[0], expected, atol=1e-6)


def test_eval_transform_is_a_center_crop_of_the_cache(img: np.ndarray) -> None:
    big = np.kron(img, np.ones((4, 4), np.uint8))  # 256x256
    out = eval_transform(big, 224)
    expected = (torch.from_numpy(big[16:240, 16:240]).float() / 255 - 0.5) / 0.5
    assert torch.allclose(out[0], expected)


def test_strong_view_is_autocontrasted(img: np.ndarray) -> None:
    dim = (img // 4 + 60).astype(np.uint8)  # values 60..123
    view = strong_view(dim, 32, torch.Generator().manual_seed(5), max_rotation=0.0, max_translate=0.0,
                       zoom=(1.0, 1.0), max_shear=0.0)
    assert view.max().item() == pytest.approx(1.0, abs=0.01)  # autocontrast on uint8 truncates
    assert view.min().item() == pytest.approx(-1.0, abs=0.01)


def test_transforms_leave_global_rng_untouched(img: np.ndarray) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    TwoViewTransform(32)(img, torch.Generator().manual_seed(9))
    eval_transform(img, 32)
    assert torch.equal(torch.get_rng_state(), state)


def test_views_reject_non_uint8_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        weak_view(np.zeros((8, 8), np.float32), 4, torch.Generator())


def _torchvision_strong_view(img: np.ndarray, size: int, generator: torch.Generator) -> torch.Tensor:
    """The strong view as torchvision's per-image ``affine`` computes it (the reference the
    batched warp must match): the same draws in the same order, defaults of strong_view."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x = random_resized_crop(img, size, generator, STRONG_SCALE, STRONG_RATIO)
    u = [float(torch.rand((), generator=generator, dtype=torch.float64)) for _ in range(5)]
    angle, tx, ty = -90 + 180 * u[0], (-0.1 + 0.2 * u[1]) * size, (-0.1 + 0.2 * u[2]) * size
    factor, shear = 0.9 + 0.2 * u[3], -10 + 20 * u[4]
    x = F.affine(x, angle=angle, translate=[tx, ty], scale=factor, shear=[shear, 0.0],
                 interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    return to_model_input(F.autocontrast(x), 0.5, 0.5)


def test_batched_views_equal_torchvision_per_image_exactly() -> None:
    """The collator's batched finish gives each image exactly the values of the per-image
    path and of torchvision's affine, so batching changes no training figure."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(80, 80), dtype=np.uint8) for _ in range(48)]
    views = TwoViewTransform(64)
    drawn = [views.draw(im, torch.Generator().manual_seed(100 + i)) for i, im in enumerate(images)]
    weak, strong = views.finish({k: torch.stack([d[k] for d in drawn]) for k in drawn[0]})
    for i, im in enumerate(images):
        assert torch.equal(weak[i], weak_view(im, 64, torch.Generator().manual_seed(100 + i)))
        g = torch.Generator().manual_seed(100 + i)
        weak_view(im, 64, g)  # the weak view's draws come first
        assert torch.equal(strong[i], _torchvision_strong_view(im, 64, g))
        one = views(im, torch.Generator().manual_seed(100 + i))
        assert torch.equal(one[0], weak[i]) and torch.equal(one[1], strong[i])


def test_warp_identity_keeps_the_image_and_rotation_moves_it(img: np.ndarray) -> None:
    x = torch.from_numpy(img)[None, None]
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(warp(x, identity), x)
    quarter = torch.tensor([[0.0, -1.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # 90 degrees
    assert torch.equal(warp(x, quarter)[0, 0], torch.rot90(x[0, 0], 1, (0, 1)))
