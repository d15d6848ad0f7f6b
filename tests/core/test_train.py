"""Training runs end to end, resumes exactly, and shards its data under torchrun."""

from __future__ import annotations

import json
import math

import pytest

from medunic_core.config import load_config
from medunic_core.data.dataset import EpochSampler
from medunic_core.errors import ConfigError
from medunic_core.optim import cosine_with_warmup
from medunic_core.train import train


def test_train_writes_metrics_checkpoint_and_config(synthetic_data, train_overrides, tmp_path):
    cfg = load_config("tiny", train_overrides(synthetic_data, tmp_path / "run"))
    result = train(cfg, progress=False)
    assert result.step == 6 and result.checkpoint.is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert {"cvl_loss", "ssv_loss", "tf_loss", "tt_loss", "lr", "pairs_per_s"} <= set(rows[0])
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "tokenizer" / "vocab.sha256").is_file()


def test_resume_after_checkpoint_continues_with_same_next_loss(synthetic_data, train_overrides, tmp_path):
    # 80 pairs at 70% train -> several batches of 8 per epoch; 9 steps cross an epoch end.
    overrides = ["train.max_steps=9"]
    full = train(load_config("tiny", train_overrides(synthetic_data, tmp_path / "a", *overrides)), progress=False)
    cfg = load_config("tiny", train_overrides(synthetic_data, tmp_path / "b", *overrides))
    first = train(cfg, progress=False, stop_at_step=4)
    other = load_config("tiny", train_overrides(synthetic_data, tmp_path / "b", *overrides, "train.lr=1e-3"))
    with pytest.raises(ConfigError, match=r"checkpoint.pt was written by a run of other settings \(train.lr "):
        train(other, progress=False)  # a checkpoint continues the run that wrote it, not another
    rest = train(cfg, progress=False)
    losses = [r["loss"] for r in full.history]
    resumed = [r["loss"] for r in first.history + rest.history]
    assert len(losses) == 9 and [r["step"] for r in rest.history][0] == 5
    assert resumed == pytest.approx(losses, abs=1e-6)


def test_ctr_off_logs_no_ctr_terms(synthetic_data, train_overrides, tmp_path):
    cfg = load_config("tiny", train_overrides(synthetic_data, tmp_path / "run", "loss.ctr=false", "train.max_steps=2"))
    result = train(cfg, progress=False)
    assert "tf_loss" not in result.history[-1] and math.isfinite(result.history[-1]["loss"])


def test_ssv_off_trains_on_the_weak_view_only(synthetic_data, train_overrides, tmp_path):
    cfg = load_config("tiny", train_overrides(synthetic_data, tmp_path / "run", "loss.ssv_weight=0", "train.max_steps=2"))
    result = train(cfg, progress=False)
    assert "ssv_loss" not in result.history[-1] and math.isfinite(result.history[-1]["loss"])


def test_sampler_shards_disjointly_and_resumes_mid_epoch():
    ranks = [list(EpochSampler(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 5
    assert {i for _, i in ranks[0] + ranks[1]} == set(range(10))
    sampler = EpochSampler(10, seed=3, rank=0, world_size=2)
    sampler.set_epoch(0, start=2)
    assert list(sampler) == ranks[0][2:]
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != [i for _, i in ranks[0]]


def test_schedule_warms_up_then_decays_to_floor():
    f = cosine_with_warmup(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_the_loop_times_its_steady_state_apart_from_its_first_steps():
    """``steady_pairs_per_s`` leaves out the first WARMUP_STEPS steps: a slow first step
    (a fresh model's kernels and allocations) lowers ``pairs_per_s`` only."""
    import time

    import torch

    from medunic_core.loop import WARMUP_STEPS, train_local
    from medunic_core.optim import Stepper

    model = torch.nn.Linear(4, 1)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0, grad_clip=None)

    def loss_fn(batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        time.sleep(0.3 if loss_fn.calls == 0 else 0.01)
        loss_fn.calls += 1
        return {"loss": model(batch).pow(2).mean()}, len(batch)

    loss_fn.calls = 0
    batches = [torch.randn(8, 4) for _ in range(WARMUP_STEPS + 5)]
    result = train_local(batches, loss_fn, stepper, len(batches))
    assert result.metrics["steady_pairs_per_s"] > 3 * result.metrics["pairs_per_s"]
    assert "steady_pairs_per_s" not in train_local(batches, loss_fn, stepper, WARMUP_STEPS).metrics
