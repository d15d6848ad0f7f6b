"""Each loss against the formula of MEDUNIC.md computed with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from medunic_core.config import load_config
from medunic_core.losses import infonce, medunic_loss, tf_loss, tt_loss
from medunic_core.models import create_model

ATOL = 1e-6


def _rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _infonce_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    n = len(a)

    def cos(x, y):
        dot = sum(float(x[k]) * float(y[k]) for k in range(len(x)))
        nx = math.sqrt(sum(float(v) ** 2 for v in x))
        ny = math.sqrt(sum(float(v) ** 2 for v in y))
        return dot / (nx * ny)

    def ce(p, q):
        total = 0.0
        for i in range(n):
            logits = [cos(p[i], q[j]) / t for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            total += log_z - logits[i]
        return total / n

    return 0.5 * (ce(a, b) + ce(b, a))


def _standardise_by_hand(z: torch.Tensor) -> list[list[float]]:
    n, d = z.shape
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        col = [float(z[i, j]) for i in range(n)]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n  # biased, as BatchNorm in training
        for i in range(n):
            out[i][j] = (col[i] - mean) / math.sqrt(var + 1e-5)
    return out


def _redundancy_by_hand(m: list[list[float]], lam: float) -> float:
    total = 0.0
    for i in range(len(m)):
        for j in range(len(m)):
            total += (1 - m[i][j]) ** 2 if i == j else lam * m[i][j] ** 2
    return total


def test_infonce_matches_hand_computation():
    a, b = _rand(3, 4, seed=0), _rand(3, 4, seed=1)
    got = infonce(a, b, temperature=0.07)
    assert got.item() == pytest.approx(_infonce_by_hand(a, b, 0.07), abs=ATOL)


def test_infonce_is_low_for_aligned_pairs_and_high_for_shuffled():
    a = _rand(8, 16, seed=2)
    assert infonce(a, a, 0.07) < infonce(a, a.roll(1, 0), 0.07)


def test_tf_and_tt_losses_match_hand_computation():
    lam, n, d = 0.0051, 3, 4
    za_raw, zb_raw = _rand(n, d, seed=3), _rand(n, d, seed=4)
    bn = torch.nn.BatchNorm1d(d, affine=False, dtype=torch.float64).train()
    za, zb = bn(za_raw), bn(zb_raw)
    a, b = _standardise_by_hand(za_raw), _standardise_by_hand(zb_raw)
    c = [[sum(a[k][i] * b[k][j] for k in range(n)) / n for j in range(d)] for i in range(d)]
    s = [[sum(a[i][k] * b[j][k] for k in range(d)) / n for j in range(n)] for i in range(n)]
    expected_tf = _redundancy_by_hand(c, lam) / (2 * d)
    expected_tt = _redundancy_by_hand(s, lam) / (2 * n * 50)
    assert tf_loss(za, zb, lam, denom=2.0).item() == pytest.approx(expected_tf, abs=ATOL)
    assert tt_loss(za, zb, lam, denom=100.0).item() == pytest.approx(expected_tt, abs=ATOL)


def test_tf_loss_is_zero_for_decorrelated_identical_views():
    # Columns of an orthogonal basis scaled to unit variance: C = I exactly.
    q, _ = torch.linalg.qr(_rand(8, 8, seed=5))
    z = q * math.sqrt(8)
    assert tf_loss(z, z, 0.0051, 2.0).item() == pytest.approx(0.0, abs=1e-9)


def test_medunic_loss_sums_weighted_parts_and_respects_ctr_switch():
    cfg = load_config("tiny", ["loss.ctr_weight=0.5", "loss.ssv_weight=2.0"]).loss
    out = {k: _rand(6, 5, seed=i) for i, k in enumerate(["image", "image_strong", "text", "ctr_a", "ctr_b"])}
    parts = medunic_loss(out, cfg)
    expected = parts["cvl_loss"] + 2.0 * parts["ssv_loss"] + 0.5 * (parts["tf_loss"] + parts["tt_loss"])
    assert torch.allclose(parts["loss"], expected)
    off = medunic_loss(out, load_config("tiny", ["loss.ctr=false"]).loss)
    assert "tf_loss" not in off and torch.allclose(off["loss"], off["cvl_loss"] + off["ssv_loss"])
    weak_only = {k: v for k, v in out.items() if k != "image_strong"}
    no_ssv = medunic_loss(weak_only, load_config("tiny", ["loss.ssv_weight=0"]).loss)
    assert "ssv_loss" not in no_ssv and torch.allclose(no_ssv["loss"], no_ssv["cvl_loss"] + no_ssv["ctr_loss"])
    with pytest.raises(ValueError, match="loss.ssv_weight=1 needs the strong image view"):
        medunic_loss(weak_only, load_config("tiny").loss)


def test_without_ssv_skipping_the_strong_view_changes_no_loss_or_gradient():
    """The strong view's encoding is skipped at ``loss.ssv_weight=0``; with weight 0 it
    added nothing to the loss, so the loss and every gradient stay as they were."""
    cfg = load_config("tiny-cnn", ["loss.ssv_weight=0", "model.image.size=32"])
    torch.manual_seed(0)
    model = create_model(cfg.model, vocab_size=50).train()
    g = torch.Generator().manual_seed(0)
    images, strong = torch.randn(2, 8, 3, 32, 32, generator=g)
    ids, mask = torch.randint(5, 50, (8, 12), generator=g), torch.ones(8, 12, dtype=torch.long)

    def loss_and_grads(views):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both passes
        parts = medunic_loss(model(images, views, ids, mask), cfg.loss)
        parts["loss"].backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_view, grads_with = loss_and_grads(strong)
    without, grads_without = loss_and_grads(None)
    assert "ssv_loss" in with_view and "ssv_loss" not in without
    assert torch.allclose(with_view["loss"], without["loss"], atol=1e-6)
    assert grads_with.keys() == grads_without.keys()
    for name, grad in grads_with.items():
        assert torch.allclose(grad, grads_without[name], atol=1e-6), name


def test_gradients_reach_only_trainable_parameters():
    cfg = load_config(
        "tiny", ["model.text.freeze_embeddings=true", "model.text.freeze_layers=2"]
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, vocab_size=50).train()
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image.size
    images = torch.randn(4, 3, size, size, generator=g)
    ids = torch.randint(5, 50, (4, 12), generator=g)
    out = model(images, images.flip(-1), ids, torch.ones_like(ids))
    medunic_loss(out, cfg.loss)["loss"].backward()
    bert = model.text_encoder.bert
    frozen = list(bert.embeddings.parameters()) + list(bert.encoder.layer[:2].parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    trained = list(bert.encoder.layer[2:].parameters()) + list(model.image_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    # P_d only receives gradient through CTR.
    assert all(p.grad is not None for p in model.ctr_head.parameters())
    model.zero_grad(set_to_none=True)
    out = model(images, images.flip(-1), ids, torch.ones_like(ids), ctr=False)
    medunic_loss(out, load_config("tiny", ["loss.ctr=false"]).loss)["loss"].backward()
    assert all(p.grad is None for p in model.ctr_head.parameters())


def test_ctr_views_differ_only_through_dropout():
    cfg = load_config("tiny")
    model = create_model(cfg.model, vocab_size=50)
    ids = torch.randint(5, 50, (4, 12))
    x = torch.randn(4, 3, cfg.model.image.size, cfg.model.image.size)
    model.train()
    out = model(x, x, ids, torch.ones_like(ids))
    assert not torch.allclose(out["ctr_a"], out["ctr_b"])
    model.eval()
    with torch.no_grad():
        out = model(x, x, ids, torch.ones_like(ids))
    assert torch.allclose(out["ctr_a"], out["ctr_b"])
