"""A run killed at any point and rerun ends with the metrics an uninterrupted run writes.

Kills are simulated in process: an exception (or Ctrl-C) raised at a chosen step, evaluation
or checkpoint leaves the run directory exactly as a dying process would; the rerun uses a
fresh grid, so no client keeps anything in memory, as after a real restart.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import RunConfig
from adc_flwr.run.files import RunDirError
from adc_flwr.run.resume import FINISHED, RESUME, run_state
from adc_flwr.run.run_dir import RunDir
from adc_flwr.training.workers import ServerWorker
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.evaluation import Evaluator
from strategies.lifecycle import run_training
from strategies.step_engine import StepEngine
from tests.support.helpers import tiny_config


class Kill(Exception):
    """Stands for SIGKILL: the run stops where it is."""


def config(path: Path) -> RunConfig:
    # Adam (the default) with client-optimizer=reset: nothing of a client outlives its round
    return tiny_config(path, method="adc", compression=0.25, num_server_rounds=3, eval_every=2)


def run(cfg: RunConfig, seed: int = 0) -> dict:
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config(), seed=seed)
    return run_training(grid, cfg, progress=lambda _: None)


def metrics(cfg: RunConfig) -> pd.DataFrame:
    return RunDir(cfg.run_dir).read_metrics().drop(columns="wall_time_s")


def tables(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics.csv (wall time aside: the simulated clock included) and clients.csv."""
    return metrics(cfg), RunDir(cfg.run_dir).read_clients()


def assert_same(cfg: RunConfig, reference: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    for got, expected in zip(tables(cfg), reference, strict=True):
        pd.testing.assert_frame_equal(got, expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    cfg = config(tmp_path_factory.mktemp("reference"))
    assert run(cfg)["status"] == "completed"
    return tables(cfg)


def kill_on_call(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, call: int, exc=Kill):
    """Make ``cls.name`` raise ``exc`` on its ``call``-th call (1-based)."""
    real = getattr(cls, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def kill_then_rerun(
    monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, cls: type, where: str, call: int
) -> dict:
    """Kill ``cfg``'s run on the ``call``-th call of ``cls.where``, rerun it with other node
    ids (a new process) and return the rerun's summary."""
    with monkeypatch.context() as patch:
        kill_on_call(patch, cls, where, call)
        with pytest.raises(Kill):
            run(cfg, seed=1)
    return run(cfg, seed=2)


@pytest.mark.parametrize(
    ("cls", "where", "call"),
    [
        (StepEngine, "server_step", 2),  # round 1, before any checkpoint
        (StepEngine, "server_step", 8),  # round 3, after two checkpoints
        (Evaluator, "central", 3),  # round 2's mid-round (eval-every) evaluation
        (Evaluator, "central", 4),  # round 2's own evaluation, before its checkpoint
    ],
)
def test_killed_run_resumes_to_the_same_metrics(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reference: tuple[pd.DataFrame, pd.DataFrame],
    cls: type,
    where: str,
    call: int,
) -> None:
    cfg = config(tmp_path)
    summary = kill_then_rerun(monkeypatch, cfg, cls, where, call)
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert_same(cfg, reference)


def test_kill_between_metrics_and_checkpoint_then_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """Killed after round 2's rows were flushed but before its checkpoint, mid-way through
    writing another row: whole rows only, nothing twice, nothing invented."""
    cfg = config(tmp_path)
    with monkeypatch.context() as patch:
        kill_on_call(patch, RunDir, "save_checkpoint", 2)
        with pytest.raises(Kill):
            run(cfg)
    with RunDir(cfg.run_dir).metrics_path.open("a") as f:
        f.write("step,2,9,2.31,,,12")  # a row cut short by the kill
    assert run(cfg)["status"] == "completed"
    assert_same(cfg, reference)


def test_ctrl_c_leaves_an_interrupted_summary_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    cfg = config(tmp_path)
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 5, exc=KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    summary = RunDir(cfg.run_dir).read_summary()
    assert summary["status"] == "interrupted" and summary["rounds"] == 1
    assert run(cfg)["status"] == "completed"
    assert_same(cfg, reference)


def test_failed_nan_run_rerun_does_not_duplicate_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    cfg = config(tmp_path)
    real = ServerWorker.step

    def nan_first(self, packets):
        return real(self, packets)._replace(loss=math.nan)

    with monkeypatch.context() as patch:
        patch.setattr(ServerWorker, "step", nan_first)
        with pytest.raises(RuntimeError, match="diverged"):
            run(cfg)
    assert RunDir(cfg.run_dir).read_summary()["status"] == "failed"
    assert run(cfg)["status"] == "completed"
    assert_same(cfg, reference)


@pytest.fixture
def crashed_in_round_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunConfig:
    cfg = config(tmp_path)
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 8)
        with pytest.raises(Kill):
            run(cfg)
    return cfg


def test_emptied_metrics_is_an_error_naming_the_file(crashed_in_round_3: RunConfig) -> None:
    path = RunDir(crashed_in_round_3.run_dir).metrics_path
    before = path.read_text()
    path.write_text("")
    with pytest.raises(RunDirError, match=r"metrics\.csv holds 0 complete rows.*Restore it"):
        run(crashed_in_round_3)
    assert path.read_text() == "" and len(before) > 0  # nothing rewritten to get past it


@pytest.mark.parametrize("name", ["checkpoint.pt", "summary.json", "config.json"])
def test_truncated_file_is_an_error_naming_it(crashed_in_round_3: RunConfig, name: str) -> None:
    path = RunDir(crashed_in_round_3.run_dir).path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match=name.replace(".", r"\.")):
        run(crashed_in_round_3)
    assert path.read_bytes() == data[: len(data) // 2]  # left for the user to restore


@pytest.mark.parametrize("num_partitions", [0, 4], ids=["node-per-partition", "pooled"])
def test_killed_sampling_run_resumes_with_the_same_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_partitions: int
) -> None:
    """Half of 4 partitions a round: the resumed run draws the partitions the uninterrupted
    one drew (the sampler's state is in the checkpoint), so the metrics are the same; with
    pooled clients too, whose two nodes run other clients after the restart."""

    def sampled(path: Path) -> RunConfig:
        return tiny_config(
            path,
            method="adc",
            compression=0.25,
            num_server_rounds=4,
            fraction_train=0.5,
            num_partitions=num_partitions,
        )

    def run4(cfg: RunConfig, seed: int) -> dict:
        nodes = 2 if cfg.pooled else 4
        grid = InProcessGrid(client_module.app, nodes, cfg.to_run_config(), seed=seed)
        return run_training(grid, cfg, progress=lambda _: None)

    whole = sampled(tmp_path / "whole")
    run4(whole, seed=0)
    cfg = sampled(tmp_path / "killed")
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 8)  # round 3
        with pytest.raises(Kill):
            run4(cfg, seed=1)
    assert run4(cfg, seed=2)["status"] == "completed"
    pd.testing.assert_frame_equal(metrics(cfg), metrics(whole))


# ---- run directories written before a key existed --------------------------------------------


def old_style(cfg: RunConfig, *missing: str) -> dict:
    """``cfg``'s config.json as a version without the keys ``missing`` wrote it."""
    return {k: v for k, v in cfg.to_run_config().items() if k not in missing}


@pytest.mark.parametrize("status", ["completed", "interrupted"])
def test_a_run_from_before_precision_and_device_is_still_this_run(
    tmp_path: Path, status: str
) -> None:
    cfg = RunConfig(out_dir=str(tmp_path), run_name="old", num_server_rounds=2)
    run_dir = RunDir(cfg.run_dir)
    run_dir.write_config(old_style(cfg, "precision", "device"))
    run_dir.write_summary({"status": status, "rounds": 2 if status == "completed" else 1})
    run_dir.append_metrics({"kind": "step", "round": 1, "step": 0, "train_loss": 2.3})
    run_dir.close()
    expected = FINISHED if status == "completed" else RESUME
    assert run_state(run_dir, cfg.to_run_config()) == expected  # fp32 is what it ran
    on_cpu = cfg.replace(device="cpu")  # `device` is never compared
    assert run_state(run_dir, on_cpu.to_run_config()) == expected
    # a key the stored run really had otherwise is still refused, precision included
    for changed, shown in [
        (cfg.replace(precision="bf16"), "precision: 'fp32' -> 'bf16'"),
        (cfg.replace(num_server_rounds=3), "num-server-rounds: 2 -> 3"),
    ]:
        with pytest.raises(RunDirError, match=f"another config \\({shown}\\)"):
            run_state(run_dir, changed.to_run_config())
