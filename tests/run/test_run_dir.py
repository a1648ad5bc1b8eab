"""Run directory: atomic writes, append-only metrics across restarts, resume, summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adc_flwr.run.files import RunDirError, atomic_torch_save, atomic_write_json, atomic_write_text
from adc_flwr.run.run_dir import METRIC_COLUMNS, RunDir
from adc_flwr.run.summary import make_summary


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_json_keeps_old_file_when_serialisation_fails(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert _no_temp_files(tmp_path)


def test_atomic_torch_save_keeps_old_file_when_pickling_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"w": torch.ones(3)})
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda; the type varies)
        atomic_torch_save(path, {"w": torch.zeros(3), "f": lambda: 0})
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert _no_temp_files(tmp_path)


def test_atomic_write_text_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert _no_temp_files(tmp_path)


def test_json_writes_numpy_torch_and_nan_as_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    atomic_write_json(path, {"a": np.float32(0.5), "b": torch.tensor(3), "r": math.nan})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 3, "r": None}


def test_metrics_append_across_restart_keeps_one_header(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_metrics({"kind": "step", "round": 1, "step": 0, "train_loss": 2.5})
    run.append_metrics(
        {"kind": "eval", "round": 1, "test_accuracy": 0.4, "compression_ratio": math.nan}
    )
    # simulated restart: a new process opens the same directory, the old one never closed
    again = RunDir(tmp_path / "run")
    again.append_metrics({"kind": "eval", "round": 2, "bytes_up_act": 1234})
    again.flush()
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS)
    assert sum(line.startswith("kind,") for line in lines) == 1
    df = again.read_metrics()
    assert list(df.columns) == list(METRIC_COLUMNS)
    assert df["kind"].tolist() == ["step", "eval", "eval"]
    assert df.loc[0, "train_loss"] == 2.5 and df.loc[2, "bytes_up_act"] == 1234
    assert math.isnan(df.loc[1, "compression_ratio"])  # NaN written as a blank cell
    assert lines[2].split(",")[METRIC_COLUMNS.index("compression_ratio")] == ""


def test_unknown_column_or_kind_raises_and_writes_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="accuracy"):
        run.append_metrics({"kind": "eval", "accuracy": 0.9})
    with pytest.raises(ValueError, match="kind"):
        run.append_metrics({"round": 1})
    assert run.read_metrics().empty


def test_torn_last_row_is_dropped_on_reopen(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"kind": "step", "round": 1, "step": 0})
    run.close()
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("step,1,1,0,9.")  # a crash mid-row
    RunDir(tmp_path).append_metrics({"kind": "step", "round": 1, "step": 1})
    df = RunDir(tmp_path).read_metrics()
    assert df["step"].tolist() == [0, 1]


def test_foreign_metrics_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text("round,acc\n1,0.5\n")
    with pytest.raises(RunDirError, match="columns"):
        RunDir(tmp_path).append_metrics({"kind": "eval", "round": 2})


def test_truncate_metrics_after_round(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"kind": "eval", "round": 0, "test_accuracy": 0.1})
    for r in (1, 2, 3):
        run.append_metrics({"kind": "step", "round": r, "step": 0, "train_loss": float(r)})
        run.append_metrics({"kind": "eval", "round": r})
    assert run.truncate_metrics_after(1) == 4
    run.append_metrics({"kind": "step", "round": 2, "step": 0, "train_loss": 9.0})  # redone
    df = run.read_metrics()
    assert df["round"].tolist() == [0, 1, 1, 2]
    assert df["train_loss"].tolist()[-1] == 9.0
    text = (tmp_path / "metrics.csv").read_text()
    assert text.count("kind,") == 1 and text.endswith("\n")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.load_checkpoint() is None
    state = {"round": 3, "w": torch.arange(4.0), "rng": torch.get_rng_state()}
    run.save_checkpoint(state)
    loaded = RunDir(tmp_path).load_checkpoint()
    assert loaded["round"] == 3 and torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["rng"], state["rng"])


class Payload:
    """What a planted checkpoint may carry: unpickling it runs code (here: makes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def plant_checkpoint(run_dir: Path, marker: Path) -> None:
    """A checkpoint.pt whose loading with full unpickling would run a command."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"round": 1, "payload": Payload(marker)}, run_dir / "checkpoint.pt")


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plant_checkpoint(tmp_path / "run", marker)
    with pytest.raises(RunDirError, match=r"checkpoint\.pt is not a checkpoint this project wrote"):
        RunDir(tmp_path / "run").load_checkpoint()
    assert not marker.exists()


def test_config_and_summary_read_back_as_written(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "a" / "b")
    assert run.read_config() is None and run.read_summary() is None
    run.write_config({"method": "adc", "compression": 0.1})
    assert run.read_config() == {"method": "adc", "compression": 0.1}
    run.write_summary(make_summary("failed", error="OOM", rounds=1))
    assert RunDir(tmp_path / "a" / "b").read_summary()["status"] == "failed"
    run.write_summary(make_summary("completed", stop_reason="rounds", test_accuracy=0.8))
    assert RunDir(tmp_path / "a" / "b").read_summary()["test_accuracy"] == 0.8


def test_make_summary_guarantees_keys() -> None:
    summary = make_summary("completed", stop_reason="budget", rounds=4, extra=1.5)
    for key in (
        "status",
        "stop_reason",
        "error",
        "rounds",
        "test_accuracy",
        "test_loss",
        "bytes_up_act",
        "bytes_up_targets",
        "bytes_down_grad",
        "bytes_model_sync",
        "compression_ratio",
        "wall_time_s",
    ):
        assert key in summary
    assert summary["rounds"] == 4 and summary["test_loss"] is None and summary["extra"] == 1.5
    assert summary["error"] is None
    with pytest.raises(ValueError, match="stop_reason"):
        make_summary("completed")
    with pytest.raises(ValueError, match="error"):
        make_summary("failed")
    with pytest.raises(ValueError, match="status"):
        make_summary("done", stop_reason="rounds")
