"""Every preset builds; loading is strict and fails loudly."""

from __future__ import annotations

import pytest
import torch

from medunic_core.checkpoint import atomic_save
from medunic_core.config import list_presets, load_config
from medunic_core.errors import CheckpointMismatchError, ConfigError
from medunic_core.models import create_model, trainable_parameters


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_builds_on_meta_device(preset):
    cfg = load_config(preset)
    with torch.device("meta"):
        model = create_model(cfg.model, vocab_size=1000)
    assert model.image_head.mlp[-1].out_features == cfg.model.head.embed_dim
    assert model.ctr_head.mlp[-1].out_features == cfg.model.head.ctr_dim
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert bool(frozen) == (cfg.model.text.freeze_layers > 0 or cfg.model.text.freeze_embeddings)


def test_vit_uses_cls_token_and_cnn_pools():
    cfg = load_config("tiny")
    vit = create_model(cfg.model, vocab_size=40).image_encoder.backbone
    assert vit.global_pool == "token"
    for name in ("resnet18", "mobilenetv3_small_050"):  # the latter has a conv head after pooling
        cnn_cfg = load_config("base", [f"model.image.name={name}"])
        cnn = create_model(cnn_cfg.model, vocab_size=40).image_encoder.eval()
        assert cnn(torch.randn(2, 3, 64, 64)).shape == (2, cnn.out_dim)


def test_unknown_timm_kwarg_is_a_config_error():
    cfg = load_config("tiny", ["model.image.kwargs.not_a_kwarg=3"])
    with pytest.raises(ConfigError, match="timm cannot build"):
        create_model(cfg.model, vocab_size=40)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    cfg = load_config("tiny")
    model = create_model(cfg.model, vocab_size=40)
    atomic_save({"model": model.state_dict()}, tmp_path / "ok.pt")
    again = create_model(cfg.model, vocab_size=40, checkpoint=tmp_path / "ok.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch.*word_embeddings"):
        create_model(cfg.model, vocab_size=41, checkpoint=tmp_path / "ok.pt")
    state = {("module." + k): v for k, v in model.state_dict().items()}  # a wrong key prefix
    atomic_save({"model": state}, tmp_path / "prefixed.pt")
    with pytest.raises(CheckpointMismatchError, match="missing"):
        create_model(cfg.model, vocab_size=40, checkpoint=tmp_path / "prefixed.pt")


def test_freeze_more_layers_than_exist_is_a_config_error():
    cfg = load_config("tiny", ["model.text.freeze_layers=9"])
    with pytest.raises(ConfigError, match="freeze_layers=9"):
        create_model(cfg.model, vocab_size=40)


def test_trainable_parameters_exclude_frozen_layers():
    cfg = load_config("tiny", ["model.text.freeze_embeddings=true", "model.text.freeze_layers=1"])
    names = [n for n, _ in trainable_parameters(create_model(cfg.model, vocab_size=40))]
    assert not any(n.startswith("text_encoder.bert.embeddings") for n in names)
    assert not any(".encoder.layer.0." in n for n in names)
    assert any(".encoder.layer.1." in n for n in names)


def test_text_pooling_cls_or_mean_of_unmasked_tokens():
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    padded, mask = torch.tensor([[1, 5, 6, 7, 2, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    torch.manual_seed(0)
    cls_model = create_model(load_config("tiny").model, vocab_size=40).text_encoder.eval()
    mean_model = create_model(load_config("tiny", ["model.text.pooling=mean"]).model, vocab_size=40).text_encoder.eval()
    mean_model.load_state_dict(cls_model.state_dict())  # pooling has no weights: same encoder
    with torch.no_grad():
        states = cls_model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert torch.allclose(cls_model(ids, torch.ones_like(ids)), states[:, 0])
        assert torch.allclose(mean_model(ids, torch.ones_like(ids)), states.mean(1), atol=1e-6)
        # padding changes nothing: the mean runs over the attention mask only
        assert torch.allclose(mean_model(padded, mask), mean_model(ids, torch.ones_like(ids)), atol=1e-5)
    with pytest.raises(ConfigError, match="model.text.pooling"):
        load_config("tiny", ["model.text.pooling=max"])
