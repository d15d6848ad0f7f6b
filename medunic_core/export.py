"""Export a trained model so that every usual loader takes it directly.

The export folder is at once:

- a medunic run folder (``config.yaml``, ``checkpoint.pt``, ``tokenizer/``) that
  ``medunic eval`` reads; ``checkpoint.pt`` also carries the per-community P_l statistics
  of ``align.eval_norm = community``;
- ``text_encoder/``: a Hugging Face model folder (``AutoModel.from_pretrained``);
- ``image_encoder/``: a timm folder (``timm.create_model("local-dir:<path>", pretrained=True)``);
- ``heads.pt``: the state dicts of P_V, P_l and P_d.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

import torch
from timm.models._hub import save_for_hf

from medunic_core.align import AlignmentState
from medunic_core.checkpoint import atomic_save
from medunic_core.config import MedUniCConfig, save_config
from medunic_core.constants import CHECKPOINT_FILE
from medunic_core.models import MedUniC


def export_model(
    model: MedUniC,
    cfg: MedUniCConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    community: Optional[AlignmentState] = None,
) -> Path:
    """Write the export folder described in the module docstring; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    state = {"model": model.state_dict()}
    if community is not None and community.communities:
        state["community_stats"] = community.to_flat()
    atomic_save(state, out / CHECKPOINT_FILE)
    if Path(tokenizer_dir).resolve() != (out / "tokenizer").resolve():
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    model.text_encoder.bert.save_pretrained(out / "text_encoder")
    image = cfg.model.image
    save_for_hf(
        model.image_encoder.backbone,
        str(out / "image_encoder"),
        model_args={**dict(image.kwargs), "num_classes": 0},
    )
    torch.save(
        {name: getattr(model, name).state_dict() for name in ("image_head", "text_head", "ctr_head")},
        out / "heads.pt",
    )
    return out


def folder_sha256(folder: str | Path) -> str:
    """SHA-256 of a folder's files (relative names and bytes, sorted): how a site checks that
    its copy of an artefact (the MLM text encoder) is the coordinator's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}|{path.stat().st_size}|".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
