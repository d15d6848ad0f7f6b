"""Test-wide environment (offline hubs, offline wandb, Flower quiet and project-local) and
fixtures: a small synthetic EN+ES dataset, a tokenizer, a tiny training config, a Flower
run config for two sites, and the task identity messages built outside Flower's runtime need."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import json
from typing import Callable

import pytest
from flwr.supercore.task_identity import TaskIdentity

from medunic_core.cli import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]

os.environ.update({**OFFLINE_ENV, "FLWR_HOME": str(ROOT / ".flwr-test")})
# Ctrl-C as in a terminal, however the tests were started. A background job of a
# non-interactive shell (`make test &` in a script, some CI runners) starts with SIGINT
# ignored; Python then keeps ignoring it and every process a test starts inherits that, so
# the tests of what Ctrl-C does would see it do nothing (a "hang", a "DID NOT RAISE").
# A handler, unlike SIG_IGN, is not inherited: children start with the default again.
signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside Flower's runtime need a task identity (FLOWER.md)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def fed_tokenizer(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medunic_core.config import load_config
    from medunic_core.data.manifest import read_manifest
    from medunic_core.vocab import build_tokenizer

    cfg = load_config("tiny", ["vocab.vocab_size=300"])
    folder = tmp_path_factory.mktemp("fed") / "tokenizer"
    records = read_manifest(synthetic_data, None, split="train")
    build_tokenizer(cfg.vocab, [(r.report, r.lang) for r in records], folder, cfg.model.text.max_length)
    return folder


@pytest.fixture
def run_config(synthetic_data: Path, fed_tokenizer: Path, tmp_path: Path, train_overrides) -> Callable[..., dict]:
    """``f(*extra_overrides)`` -> a Flower run config for two sites (en-1, es-1): the tests'
    tiny model and data settings, two rounds of 2 local steps."""

    def make(*extra: str) -> dict:
        overrides = [
            *train_overrides(synthetic_data, tmp_path / "centralized"),
            f"fed.out_dir={tmp_path / 'run'}", "fed.rounds=2", "fed.local_steps=2", "train.warmup_steps=1",
            "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]", "eval.tsne=false", *extra,
        ]
        return {
            "preset": "tiny",
            "overrides": json.dumps(overrides),
            "sites": "en-1:en,es-1:es",
            "tokenizer": str(fed_tokenizer),
        }

    return make
