"""The Med-UniC ServerApp: Flower's entry point on the coordinator (``server.app:app``).

The run config's ``stage`` picks the run: ``vocab`` (server.vocabulary), ``mlm``
(server.mlm) or ``vlp`` (the default: server.rounds).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medunic_core.errors import ConfigError
from server.mlm import MlmRun
from server.rounds import FederatedRun
from server.vocabulary import VocabularyStage

STAGES = {"vocab": VocabularyStage, "mlm": MlmRun, "vlp": FederatedRun}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    stage = str(context.run_config.get("stage", "vlp"))
    if stage not in STAGES:
        raise ConfigError(f"run config stage={stage!r} is not one of {sorted(STAGES)}")
    STAGES[stage](context.run_config).run(grid)
