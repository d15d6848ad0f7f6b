"""Names shared by writers and readers of files, and defaults shared by the site daemon and
the core, so that they cannot drift apart."""

from __future__ import annotations

from pathlib import Path

# The Flower app: pyproject.toml with [tool.flwr.app] and the packages its FAB carries. The
# coordinator runs `flwr run APP_DIR`; a site allows the FAB built from its own APP_DIR.
APP_DIR = Path(__file__).resolve().parents[1]

LANGUAGES: tuple[str, ...] = ("en", "es")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Findings of the synthetic generator and of the zero-shot prompts (CheXpert-style names).
FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "edema",
)

MANIFEST_FIELDS: tuple[str, ...] = ("id", "image_path", "report", "lang", "split", "site", "labels")

VOCAB_SHA_FILE = "vocab.sha256"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
DATA_PROBLEMS_FILE = "data_problems.json"  # a training run's unreadable images, by row, id and file

# A deployment site's release floors (medunic_core.privacy): here, so that the site daemon's
# commands read them without importing Opacus.
DEFAULT_MIN_PAIRS = 32
DEFAULT_MIN_DF = 2
