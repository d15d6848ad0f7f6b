"""Held-out losses are the training objective on held-out pairs: each BatchNorm standardises
over its own batch as in training (not with its running statistics), and the model comes
back exactly as it was."""

from __future__ import annotations

import torch

from medunic_core.config import load_config
from medunic_core.data.dataset import prepare_images
from medunic_core.data.preprocess import ImageCache
from medunic_core.evaluation.run import heldout_losses, heldout_records, load_run
from medunic_core.train import train


def test_held_out_losses_use_batch_statistics_and_leave_the_model_as_it_was(synthetic_data, train_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", train_overrides(synthetic_data, run, "train.max_steps=2", "mlm.steps=0")), progress=False)
    cfg, tokenizer, model = load_run(run)
    cache = ImageCache(cfg.data.cache_dir, cfg.model.image.cache_size)
    test, _ = prepare_images(heldout_records(cfg), cache, 1.0, progress=False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = heldout_losses(model, tokenizer, cfg, test, cache, torch.device("cpu"))
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # running statistics far from the batches' own: the held-out losses do not move
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.fill_(50.0)
            m.running_var.fill_(1e-4)
    again = heldout_losses(model, tokenizer, cfg, test, cache, torch.device("cpu"))
    assert again.keys() == losses.keys() and all(abs(again[k] - losses[k]) < 1e-5 for k in losses), (losses, again)
