"""The MLM stage as a federated run over the real ClientApp (in-process grid)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModel

from medunic_core.federation.runconfig import load_run_config
from medunic_core.federation.stages import MLM, stage_model
from medunic_core.vocab import load_tokenizer
from server.rounds import ROUNDS_FILE
from server.stages import TEXT_ENCODER_DIR, Federation, MlmStage, VlpStage
from tests.inprocess import InProcessGrid


def test_mlm_stage_trains_the_text_encoder_that_vlp_starts_from(run_config, fed_tokenizer):
    rc = run_config("fed.rounds=2", "fed.local_steps=3", "mlm.batch_size=8", "mlm.warmup_steps=1", "mlm.lr=1e-3")
    grid = InProcessGrid(rc)
    run = MlmStage(Federation.from_run_config(rc))
    folder = run.run(grid)
    assert {m.metadata.message_type for m in grid.sent} == {"train.mlm"}
    rows = [json.loads(line) for line in (run.out / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(sorted(r["sites"]) == ["en-1", "es-1"] and r["train"]["train_mlm_loss"] > 0 for r in rows)
    # the averaged weights moved away from the shared initialisation
    start = stage_model(load_run_config(rc), load_tokenizer(fed_tokenizer), MLM).base_model.state_dict()
    saved = AutoModel.from_pretrained(str(folder), add_pooling_layer=False).state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in start.items() if k in saved)
    # VLP (the next stage) loads it as its text encoder
    vlp = run_config(f"model.text.pretrained={folder}", f"fed.out_dir={run.out / 'vlp'}")
    vlp["tokenizer"] = str(run.out / "tokenizer")
    model = VlpStage(Federation.from_run_config(vlp)).model
    ours = model.text_encoder.bert.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in saved.items())
    assert folder == run.out / TEXT_ENCODER_DIR
