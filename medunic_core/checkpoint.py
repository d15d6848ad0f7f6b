"""Checkpoint I/O: strict loading with a readable diff, atomic saves, exact-resume state.

The public Med-UniC code loaded downstream weights with ``strict=False`` and silently
loaded nothing; here a mismatch always fails and says which keys and shapes differ.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from medunic_core.errors import CheckpointMismatchError, DivergenceError


def _diff(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in sorted(set(model_state) & set(state))
        if tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:10]) + (f" ... (+{len(items) - 10})" if len(items) > 10 else "")
            lines.append(f"{len(items)} {title}: {shown}")
    return lines


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` only if every key and shape matches."""
    problems = _diff(module.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not match the model:\n  " + "\n  ".join(problems)
            + "\n  (check the preset/config the checkpoint was trained with)"
        )
    module.load_state_dict(state, strict=True)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, sampling), for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`atomic_save` (tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"checkpoint {path} does not exist")
    # RNG states hold numpy arrays and tuples, so the full unpickler is needed; these files
    # are only ever written by this project (never load checkpoints from untrusted sources).
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- zip, pickle and EOF errors of a damaged file
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}): it is "
            "truncated or damaged; restore it from a backup, or delete it (train.resume=false) to start over"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"checkpoint {path} holds a {type(state).__name__}, not a medunic checkpoint")
    return state


def check_finite(state: Mapping[str, Any], what: str) -> None:
    """Raise DivergenceError if any tensor or array in ``state`` is not finite: non-finite
    weights are never written (a resume would otherwise replace a good checkpoint)."""
    bad = [k for k, v in state.items()
           if (isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
           or (isinstance(v, np.ndarray) and v.dtype.kind == "f" and not bool(np.isfinite(v).all()))]
    if bad:
        raise DivergenceError(f"{what}: {len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); "
                              "nothing was saved")
