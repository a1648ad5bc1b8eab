"""``client-optimizer = keep``: a client's optimiser moments outlive its round, so a resumed
run must bring them back (they are in the checkpoint) or its clients restart them and the
run is not the one it continues. Kills are simulated in process as in test_resume.py; the
rerun's grid is new, so no node's ``context.state`` holds anything, as after a restart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from strategies.step_engine import StepEngine
from tests.run.test_resume import Kill, kill_on_call
from tests.support.helpers import tiny_config


def keep_config(path: Path, num_partitions: int) -> RunConfig:
    """Four rounds of Adam with kept moments; pooled: 4 clients on 2 nodes, half a round."""
    return tiny_config(
        path,
        method="adc",
        compression=0.25,
        num_server_rounds=4,
        local_steps=2,
        client_optimizer="keep",
        num_partitions=num_partitions,
        fraction_train=0.5 if num_partitions else 1.0,
    )


def run(cfg: RunConfig, seed: int) -> dict:
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config(), seed=seed)
    return run_training(grid, cfg, progress=lambda _: None)


def tables(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    run_dir = RunDir(cfg.run_dir)
    return run_dir.read_metrics().drop(columns="wall_time_s"), run_dir.read_clients()


@pytest.mark.parametrize("num_partitions", [0, 4], ids=["node-per-partition", "pooled"])
def test_killed_keep_run_resumes_with_the_clients_moments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_partitions: int
) -> None:
    whole = keep_config(tmp_path / "whole", num_partitions)
    assert run(whole, seed=0)["status"] == "completed"
    cfg = keep_config(tmp_path / "killed", num_partitions)
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 6)  # round 3, after two checkpoints
        with pytest.raises(Kill):
            run(cfg, seed=1)
    assert run(cfg, seed=2)["status"] == "completed"
    for got, expected in zip(tables(cfg), tables(whole), strict=True):
        pd.testing.assert_frame_equal(got, expected)
    assert len(RunDir(cfg.run_dir).load_checkpoint()["client_moments"]) == (num_partitions or 2)
