"""The federated alignment state: the exactness property of DESIGN.md and its plumbing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medunic_core.align import CROSS_KEY, Aligner, AlignmentState, community_statistics
from medunic_core.losses import tf_loss, tf_loss_from_c
from medunic_core.models.heads import ProjectionHead

N_EN, N_ES, D_IN = 12, 7, 16


class Heads(nn.Module):
    """The text path of Med-UniC after F_l: P_l and P_d, named as in the full model."""

    def __init__(self) -> None:
        super().__init__()
        self.text_head = ProjectionHead(D_IN, 24, 8)
        self.ctr_head = ProjectionHead(D_IN, 24, 10)

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"text": self.text_head(h_a), "ctr_a": self.ctr_head(h_a), "ctr_b": self.ctr_head(h_b)}


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    # two communities with different offsets, as two languages would have
    h_a = torch.cat([torch.randn(N_EN, D_IN, generator=g) + 1.5, torch.randn(N_ES, D_IN, generator=g) - 1.0])
    h_b = h_a + 0.1 * torch.randn(h_a.shape, generator=g)  # a second "dropout view"
    langs = ["en"] * N_EN + ["es"] * N_ES
    torch.manual_seed(0)
    return Heads().double().train(), h_a.double(), h_b.double(), langs


def _centralized(model, h_a, h_b, langs):
    aligner = Aligner(model, mode="record")
    with aligner.attached():
        aligner.begin_batch(langs)
        out = model(h_a, h_b)
    return out, aligner.collected


def test_mixed_site_equals_centralized(batch):
    """With ES's sums from the same model, the EN site reproduces the mixed batch exactly."""
    model, h_a, h_b, langs = batch
    site = copy.deepcopy(model)
    central, sums = _centralized(model, h_a, h_b, langs)
    others = AlignmentState({"es": sums.sums["es"]})

    aligner = Aligner(site, mode="mixed", others=others)
    h_en_a = h_a[:N_EN].clone().requires_grad_(True)
    with aligner.attached():
        aligner.begin_batch(["en"] * N_EN)
        out = site(h_en_a, h_b[:N_EN])
        c_mix = aligner.mixed_cross(out["ctr_a"], out["ctr_b"])
    assert aligner.live_weight() == pytest.approx(N_EN / (N_EN + N_ES))
    for name in ("text", "ctr_a", "ctr_b"):
        torch.testing.assert_close(out[name], central[name][:N_EN], atol=1e-5, rtol=0)
    c_central = central["ctr_a"].t() @ central["ctr_b"] / (N_EN + N_ES)
    torch.testing.assert_close(c_mix, c_central, atol=1e-5, rtol=0)
    l_site = tf_loss_from_c(c_mix, 0.0051, 2.0)
    l_central = tf_loss(central["ctr_a"], central["ctr_b"], 0.0051, 2.0)
    assert float(l_site.detach()) == pytest.approx(float(l_central.detach()), abs=1e-5)
    # gradients reach the live batch
    l_site.backward()
    assert h_en_a.grad is not None and torch.isfinite(h_en_a.grad).all() and h_en_a.grad.abs().sum() > 0


def test_local_normalisation_differs(batch):
    """Without the others' sums a site standardises over its own language only."""
    model, h_a, h_b, langs = batch
    central, _ = _centralized(copy.deepcopy(model), h_a, h_b, langs)
    local = model(h_a[:N_EN], h_b[:N_EN])
    assert (local["text"] - central["text"][:N_EN]).abs().max() > 0.1


def test_sums_add_and_travel_flat(batch):
    model, h_a, h_b, langs = batch
    _, sums = _centralized(model, h_a, h_b, langs)
    assert sums.communities == ["en", "es"]
    assert float(sums.sums["en"]["text_head.norm#0.n"]) == N_EN
    assert sums.sums["es"][CROSS_KEY].shape == (10, 10)
    flat = sums.to_flat()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())
    back = AlignmentState.from_flat(flat)
    torch.testing.assert_close(back.sums["es"][CROSS_KEY], sums.sums["es"][CROSS_KEY], rtol=1e-6, atol=1e-4)
    doubled = back.merged(back)
    assert float(doubled.sums["en"]["ctr_head.norm#1.n"]) == 2 * N_EN
    replaced = doubled.replaced_by(AlignmentState({"en": back.sums["en"]}))
    assert float(replaced.sums["en"]["ctr_head.norm#1.n"]) == N_EN
    assert float(replaced.sums["es"]["ctr_head.norm#1.n"]) == 2 * N_ES
    with pytest.raises(ValueError, match="community"):
        AlignmentState.from_flat({"no-slash": np.zeros(1)})


def test_community_eval_norm_uses_each_language_statistics(batch):
    model, h_a, h_b, langs = batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sums = community_statistics(model, h_a, langs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # running statistics untouched
    model.eval()
    aligner = Aligner(model, mode="community", others=sums)
    with aligner.attached():
        aligner.begin_batch(langs)
        t = model.text_head(h_a)
    # the final affine-free BatchNorm standardised each language on its own training sums,
    # which were taken over exactly these rows: zero mean per language
    assert t[:N_EN].mean(0).abs().max() < 1e-6
    assert t[N_EN:].mean(0).abs().max() < 1e-6
    with pytest.raises(ValueError, match="no 'fr' statistics"):
        with aligner.attached():
            aligner.begin_batch(["fr"] * 3)
            model.text_head(h_a[:3])


def test_a_batch_of_every_community_mixes_nothing_in_as_centralized(batch):
    """A site of en+es under train_norm=mixed: its batch already is the mixed population, so
    the stored moments of its own communities change nothing (centralized training, exactly)."""
    model, h_a, h_b, langs = batch
    site = copy.deepcopy(model)
    central, sums = _centralized(model, h_a, h_b, langs)
    aligner = Aligner(site, mode="mixed", others=sums)
    with aligner.attached():
        aligner.begin_batch(langs)
        out = site(h_a, h_b)
        assert aligner.mixed_cross(out["ctr_a"], out["ctr_b"]) is None and aligner.live_weight() == 1.0
    for name in ("text", "ctr_a", "ctr_b"):
        torch.testing.assert_close(out[name], central[name], atol=0, rtol=0)
    for (name, got), (_, want) in zip(site.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)  # running statistics too


def test_local_standardises_each_language_of_a_batch_and_tracks_the_whole_batch(batch):
    """train_norm=local at a site of en+es: each language's rows on their own moments; the
    running statistics (eval_norm=global) follow the whole batch, as plain BatchNorm's do."""
    model, h_a, h_b, langs = batch
    site = copy.deepcopy(model)
    model(h_a, h_b)  # plain BatchNorm over the batch
    aligner = Aligner(site, mode="local")
    with aligner.attached():
        aligner.begin_batch(langs)
        out = site(h_a, h_b)
    assert out["text"][:N_EN].mean(0).abs().max() < 1e-6 and out["text"][N_EN:].mean(0).abs().max() < 1e-6
    first, plain = site.text_head.mlp[1], model.text_head.mlp[1]  # same input in both: the Linear's output
    torch.testing.assert_close(first.running_mean, plain.running_mean)
    torch.testing.assert_close(first.running_var, plain.running_var)
    assert int(first.num_batches_tracked) == 1
