"""Test-wide environment: offline hubs, offline wandb, Flower quiet and project-local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medunic_core.cli import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]

os.environ.update({**OFFLINE_ENV, "FLWR_HOME": str(ROOT / ".flwr-test")})


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic EN+ES dataset (PNG and DICOM), generated once per test session."""
    from medunic_core.config import load_config
    from medunic_core.data.synthetic.generator import generate

    out = tmp_path_factory.mktemp("synthetic")
    sites = "[{name: en-1, lang: en, n: 40}, {name: es-1, lang: es, n: 40, profile: portable}]"
    cfg = load_config("tiny", ["synth.image_size=128", f"synth.sites={sites}"])
    return generate(cfg.synth, out, progress=False)


def _tiny_train_overrides(manifest: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.manifest={manifest}",
        f"data.cache_dir={manifest.parent / 'cache'}",
        f"train.out_dir={out_dir}",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.log_every=1",
        "train.ckpt_every=100",
        "train.warmup_steps=2",
        "logging.wandb=false",
        "vocab.vocab_size=300",
        "model.image.kwargs.depth=2",
        "model.text.num_layers=2",
        f"mlm.out_dir={out_dir.parent / (out_dir.name + '-mlm')}",
        "mlm.steps=10",
        "mlm.warmup_steps=2",
        "mlm.log_every=5",
        *extra,
    ]


@pytest.fixture
def train_overrides():
    """``f(manifest, out_dir, *extra)``: a few-second training config of the tiny preset."""
    return _tiny_train_overrides
