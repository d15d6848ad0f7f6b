"""What travels between a site and the coordinator (DESIGN.md, "What travels").

Weights: the trainable parameters and the BatchNorm running statistics, by state-dict
name; frozen layers never travel. Alongside: sample counts, the alignment sums of
:mod:`medunic_core.align`, a mask of the token rows a site used (so that the server
averages each row of the token-embedding matrix over the sites that trained it) and
metrics. Never: images, report text, per-sample embeddings.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch
from torch import nn

from medunic_core.errors import CheckpointMismatchError
from medunic_core.federation.payload import WIRE_DTYPES

TOKEN_EMBEDDINGS = "text_encoder.bert.embeddings.word_embeddings.weight"
BN_BUFFERS = ("running_mean", "running_var")


def wire_names(model: nn.Module) -> list[str]:
    """State-dict names that travel: trainable parameters, then BatchNorm running stats."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    names += [
        f"{m}.{b}" if m else b
        for m, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm)
        for b in BN_BUFFERS
    ]
    return names


def is_batchnorm_entry(model: nn.Module, name: str) -> bool:
    """True for the parameters and buffers of BatchNorm layers (the FedBN policy keeps them)."""
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def model_arrays(model: nn.Module, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The travelling weights as named numpy arrays (``dtype`` on the wire)."""
    state = model.state_dict()
    np_dtype = WIRE_DTYPES[dtype]
    return {n: state[n].detach().cpu().numpy().astype(np_dtype) for n in wire_names(model)}


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays (sorted names; each name, dtype, shape and bytes): a resumed
    coordinator logs it for the weights and alignment state it loaded (server.rounds)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray], keep: Mapping[str, torch.Tensor] = {}) -> None:
    """Load travelling weights into ``model``; names and shapes must match exactly.

    ``keep`` holds entries to use instead of the received ones (FedBN keeps local
    BatchNorms). A mismatch names what is missing, unexpected or mis-shaped.
    """
    expected = wire_names(model)
    state = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    shapes = [
        f"{n}: received {tuple(arrays[n].shape)}, model {tuple(state[n].shape)}"
        for n in expected
        if n in arrays and tuple(arrays[n].shape) != tuple(state[n].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"missing: {', '.join(missing[:8])}" if missing else "",
                 f"unexpected: {', '.join(unexpected[:8])}" if unexpected else "",
                 "mis-shaped: " + "; ".join(shapes[:8]) if shapes else ""]
        raise CheckpointMismatchError(
            "received weights do not fit this site's model (same preset, vocabulary and "
            "overrides as the run?)\n  " + "\n  ".join(line for line in lines if line)
        )
    with torch.no_grad():
        for n in expected:
            value = keep[n] if n in keep else torch.from_numpy(np.asarray(arrays[n]))
            state[n].copy_(value.to(state[n].dtype))
