"""Fixtures for the Flower adapters: a message identity, a federation config and a grid
that delivers messages to the real ClientApp in this process (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from flwr.supercore.task_identity import TaskIdentity

from medunic_core.config import load_config
from medunic_core.data.manifest import read_manifest
from medunic_core.vocab import build_tokenizer


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside Flower's runtime need a task identity (FLOWER.md)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def fed_tokenizer(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
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
