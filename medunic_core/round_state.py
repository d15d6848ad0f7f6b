"""What a site carries from one round of a run to the next, and never sends.

A federated round is a slice of one local training run: the site keeps its AdamW moments
(``fed.site_optimizer = keep``), its position in its data stream and its RNG state, so
that round r continues where round r - 1 stopped, as centralized training would. Without
them every round restarts AdamW from zero moments, whose first steps move every parameter
by about the learning rate whatever its gradient.

The state lives on disk in the site's state folder (so a restarted site daemon continues),
one folder per run and stage, one file per completed round. Round r loads the file of round
r - 1; when it is missing (the site's first round in this run, a site that joined late, a
lost state folder) the round starts afresh. A round that is redone (the coordinator
resumed) loads round r - 1 again, so the two latest files are kept.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from medunic_core.checkpoint import atomic_save, load_checkpoint
from medunic_core.errors import CheckpointMismatchError

log = logging.getLogger(__name__)

STALE_RUN_S = 7 * 24 * 3600  # other runs' folders untouched this long are removed


class RoundState:
    """The carried state of one site, run and stage (``folder=None``: nothing is kept)."""

    def __init__(self, state_dir: Optional[str | Path], run_key: str, stage: str) -> None:
        run = hashlib.sha256(run_key.encode()).hexdigest()[:16]
        self.root = Path(state_dir) / "rounds" if state_dir else None
        self.folder = self.root / f"{stage}-{run}" if self.root else None

    def _file(self, server_round: int) -> Path:
        assert self.folder is not None
        return self.folder / f"round-{server_round}.pt"

    def load(self, server_round: int) -> Optional[dict[str, Any]]:
        """The state saved after round ``server_round - 1`` of this run, or None."""
        if self.folder is None or server_round <= 1 or not self._file(server_round - 1).is_file():
            return None
        try:
            return load_checkpoint(self._file(server_round - 1))
        except CheckpointMismatchError as exc:  # a damaged file: this round starts afresh, said
            log.warning("%s; round %d starts afresh", exc, server_round)
            return None

    def save(self, server_round: int, state: dict[str, Any]) -> None:
        """Keep ``state`` as the state after ``server_round``; drop what no round can need."""
        if self.folder is None or self.root is None:
            return
        atomic_save({**state, "round": server_round}, self._file(server_round))
        for old in self.folder.glob("round-*.pt"):
            if int(old.stem.split("-")[1]) < server_round - 1:
                old.unlink(missing_ok=True)
        for other in self.root.iterdir():
            if other != self.folder and time.time() - other.stat().st_mtime > STALE_RUN_S:
                shutil.rmtree(other, ignore_errors=True)
