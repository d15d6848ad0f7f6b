"""Flower records <-> named numpy arrays (shared by the ClientApp and the strategy)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_record(arrays: dict[str, np.ndarray], dtype=None) -> ArrayRecord:
    """An ArrayRecord of named arrays, optionally cast (fp16 on the wire)."""
    return ArrayRecord(
        array_dict={
            k: Array.from_numpy_ndarray(np.ascontiguousarray(v if dtype is None else v.astype(dtype)))
            for k, v in arrays.items()
        }
    )


def record_arrays(record: ArrayRecord, dtype=None) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord, optionally cast (fp32 before averaging)."""
    return {k: (v.numpy() if dtype is None else v.numpy().astype(dtype)) for k, v in record.items()}
