"""Presets load, overrides apply, and mistakes are named errors."""

from __future__ import annotations

import pytest

from medunic_core.config import list_presets, load_config, save_config
from medunic_core.errors import ConfigError


def test_presets_include_tiny_and_base():
    assert {"tiny", "base"} <= set(list_presets())


def test_base_preset_has_paper_constants():
    cfg = load_config("base")
    assert cfg.model.image.name == "vit_base_patch16_224" and cfg.model.image.size == 224
    assert cfg.model.text.num_layers == 12 and cfg.model.text.freeze_layers == 9
    assert cfg.model.head.ctr_dim == 1024
    assert cfg.loss.temperature == 0.07 and cfg.loss.ctr_lambda == 0.0051
    assert cfg.loss.tf_denom == 2.0 and cfg.loss.tt_denom == 100.0


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["train.lr=0.01", "loss.ctr=false", "model.image.kwargs.depth=2"])
    assert cfg.train.lr == 0.01 and cfg.loss.ctr is False and cfg.model.image.kwargs["depth"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("train.lr=fast", "train.lr"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_override_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(config_file=tmp_path / "config.yaml")
    assert again == cfg


def test_config_is_read_only():
    cfg = load_config("tiny")
    with pytest.raises(Exception):
        cfg.train.lr = 1.0


@pytest.mark.parametrize(
    "override",
    ["align.train_norm=global", "align.eval_norm=local", "fed.strategy=fedsgd", "fed.bn=none", "fed.wire_dtype=bf16"],
)
def test_choice_fields_name_the_allowed_values(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"bad value for '{key}'.*not one of"):
        load_config("tiny", [override])
