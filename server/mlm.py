"""The MLM stage (``stage=mlm``): Stage 2 of MEDUNIC.md as a Flower run.

The same round loop, checkpoints and resume as VLP (server.rounds.FederatedRun); what
changes is the model (text encoder + MLM head, client.site.build_mlm_model), the sites'
handler (``train.mlm``: medunic_core.mlm.train_mlm_site), no alignment state or
evaluation rounds, and the export: ``<fed.out_dir>/text_encoder`` (the encoder without
its head, ``save_pretrained``) next to a copy of the run's ``tokenizer``, which VLP then
starts from with ``model.text.pretrained=<out>/text_encoder``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid

from client.site import build_mlm_model
from medunic_core.exchange import load_arrays
from medunic_core.federation import payload as P
from server.report import write_federated_report
from server.rounds import FederatedRun
from server.strategy import MedUniCAggregation, make_strategy

log = logging.getLogger("flwr.medunic")

TEXT_ENCODER_DIR = "text_encoder"


class MlmRun(FederatedRun):
    """Federated masked-language post-training of the text encoder."""

    def _build_model(self) -> torch.nn.Module:
        return build_mlm_model(self.cfg, self.tokenizer)

    def _make_strategy(self) -> MedUniCAggregation:
        key = f"{self.model.base_model_prefix}.embeddings.word_embeddings.weight"
        return make_strategy(self.cfg, self.num_sites, self.vocab_sha, message_type=P.TRAIN_MLM, token_key=key,
                             max_examples=self.cfg.fed.local_steps * self.cfg.mlm.batch_size,
                             identities=self.identities)

    def _before_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        """No statistics pass: the MLM stage has no alignment state."""

    def _evaluate_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], row: dict[str, Any]) -> None:
        """The sites' MLM losses (in the row's ``train``) are this stage's measure."""

    def _export(self, arrays: dict[str, np.ndarray]) -> Path:
        load_arrays(self.model, arrays)
        folder = self.out / TEXT_ENCODER_DIR
        self.model.base_model.save_pretrained(folder)
        shutil.copytree(self.tokenizer_dir, self.out / "tokenizer", dirs_exist_ok=True)
        log.info("MLM stage: text encoder in %s; report: %s", folder, write_federated_report(self.out))
        return folder
