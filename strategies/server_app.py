"""Flower ServerApp: run config -> SplitLearningStrategy -> run directory."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from adc_flwr.config import RunConfig
from adc_flwr.memory import map_large_blocks
from strategies.experiment import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then train; failures are recorded in summary.json and re-raised."""
    map_large_blocks()  # this process also holds every node's context.state (simulation)
    cfg = RunConfig.from_run_config(context.run_config)
    run_experiment(grid, cfg)
