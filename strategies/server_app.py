"""Flower ServerApp: run config -> SplitLearningStrategy -> run directory."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from adc_flwr.config import RunConfig
from strategies.lifecycle import run_training
from strategies.memory import map_large_blocks

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then train; failures are recorded in summary.json and re-raised."""
    map_large_blocks()  # this process also holds every node's context.state (simulation)
    cfg = RunConfig.from_run_config(context.run_config)
    run_training(grid, cfg)
