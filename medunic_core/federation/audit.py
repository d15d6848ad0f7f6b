"""What a site sends, described for its audit log (DESIGN.md, "What travels").

Every reply a site sends is written to ``<state>/audit.jsonl`` before it leaves: the run,
round and message type, and per record its kind and keys or, for arrays, every name,
shape, dtype and byte count, the payload's total bytes, its SHA-256, and the epsilon a DP
release spent. The digest is computed from the reply as plain data (:class:`Content`) over a
canonical serialisation, so the coordinator computes the same digest from what it received:
an operator can prove that what left the site is what the log says.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from medunic_core.federation import payload as P
from medunic_core.federation.replies import Content


def content_sha256(content: Content) -> str:
    """SHA-256 of a reply: records sorted by name; arrays as name, dtype, shape and bytes;
    metrics and configs as canonical JSON."""
    digest = hashlib.sha256()
    for kind, records in (("arrays", content.arrays), ("metrics", content.metrics), ("config", content.configs)):
        for name in sorted(records):
            digest.update(f"{kind}:{name}|".encode())
            record = records[name]
            if kind == "arrays":
                for key in sorted(record):
                    a = np.ascontiguousarray(record[key])
                    digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
                    digest.update(a.tobytes())
            else:
                digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def audit_entry(content: Content, **context: Any) -> dict[str, Any]:
    """One audit-log line: ``context`` (run, round, message type, ...), the records, bytes,
    SHA-256 and, for a DP release, its epsilon."""
    records: dict[str, Any] = {}
    total = 0
    for name, arrays in sorted(content.arrays.items()):
        entries = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype), "bytes": int(np.asarray(v).nbytes)}
                   for k, v in sorted(arrays.items())}
        total += sum(e["bytes"] for e in entries.values())
        records[name] = {"kind": "arrays", "arrays": entries}
    for kind, group in (("metrics", content.metrics), ("config", content.configs)):
        for name, record in sorted(group.items()):
            size = len(json.dumps(record, sort_keys=True, default=str).encode())
            total += size
            records[name] = {"kind": kind, "keys": sorted(record), "bytes": size}
    entry = {**context, "records": records, "bytes": total, "sha256": content_sha256(content)}
    if P.PRIVACY in content.configs:
        entry["epsilon"] = content.configs[P.PRIVACY].get("epsilon")
    return entry
