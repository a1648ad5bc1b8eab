"""``augment = "paper"``: the augmentation is seeded by (run seed, partition, the partition's
batch number), never by the process's RNG, so the same seed gives the same run and a killed
run resumes to the metrics of an uninterrupted one. Kills are simulated in process as in
test_resume.py; each rerun has a fresh grid with other node ids, as after a restart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import RunConfig
from strategies.step_engine import StepEngine
from tests.run.test_resume import Kill, kill_on_call, run, tables
from tests.support.helpers import tiny_config


def config(path: Path, augment: str = "paper") -> RunConfig:
    """Two rounds of ADC (plan replay) on 2 clients, 2 steps each."""
    return tiny_config(
        path, method="adc", compression=0.25, num_server_rounds=2, local_steps=2, augment=augment
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    cfg = config(tmp_path_factory.mktemp("reference"))
    assert run(cfg, seed=0)["status"] == "completed"
    return tables(cfg)


def test_same_seed_gives_the_same_augmented_run(
    tmp_path: Path, reference: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    again = config(tmp_path / "again")
    assert run(again, seed=3)["status"] == "completed"  # other node ids, same partitions
    for got, expected in zip(tables(again), reference, strict=True):
        pd.testing.assert_frame_equal(got, expected)


def test_killed_augmented_run_resumes_to_the_same_metrics(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reference: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """Killed in round 2 (after round 1's checkpoint): the rerun's clients count their
    batches on from round 1's and draw the images the uninterrupted run drew."""
    cfg = config(tmp_path)
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 4)  # round 2's second step
        with pytest.raises(Kill):
            run(cfg, seed=1)
    summary = run(cfg, seed=2)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    for got, expected in zip(tables(cfg), reference, strict=True):
        pd.testing.assert_frame_equal(got, expected)
