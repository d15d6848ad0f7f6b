"""The Med-UniC ServerApp: Flower's entry point on the coordinator (``server.app:app``)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.rounds import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    FederatedRun(context.run_config).run(grid)
