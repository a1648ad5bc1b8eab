"""``python -m simulations.plan``: an experiment's bytes, steps and stops, offline.

Two kinds of evidence: the plan of ``paper_deit_cifar100`` with a config-only stand-in of
DeiT-Tiny equals the arithmetic its header derives by hand, and on tiny local stand-ins the
plan equals, byte for byte and step for step, what real runs of the experiment's points book.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest

from adc_flwr.wire.sizes import npy_header_nbytes
from simulations import plan, step_costs
from simulations.experiments import load_experiment
from simulations.sweep import run_sweep
from tests.support.hub_standins import save_parquet_images, save_tiny_vit

NPY_HEADER = 128  # np.save's header of a small array (format 1.0, padded to 64 bytes)


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, and the Arrow cache of the parquet stand-in in tmp."""
    import datasets

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def deit_tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """facebook/deit-tiny-patch16-224's geometry as a config alone (no weights)."""
    from transformers import ViTConfig

    folder = tmp_path_factory.mktemp("deit-tiny")
    ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        patch_size=16,
        image_size=224,
        qkv_bias=True,
        num_labels=1000,
    ).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    return folder / "config.json"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


# ---- the paper's setting, against its header's arithmetic -------------------------------


def test_the_plan_of_the_paper_experiment_matches_its_header(
    deit_tiny_config: Path, tmp_path: Path
) -> None:
    """`none`, and the two cheapest points (the ones nearest the step cap), as the header of
    paper_deit_cifar100.toml derives them for CIFAR-100 (50,000 train images, 100 classes)."""
    lines: list[str] = []
    table = tmp_path / "plan.csv"
    only = "name=none-s43422,topk-c0.01-s43422,adc-c0.01-s43422"
    argv = ["paper_deit_cifar100", "--model", str(deit_tiny_config)]
    argv += ["--train-size", "50000", "--num-classes", "100", "--only", only, "--csv", str(table)]
    assert plan.main(argv, out=lines.append) == 0
    rows = _rows(table)
    assert set(rows) == {"none-s43422", "topk-c0.01-s43422", "adc-c0.01-s43422"}
    b, n, d = 128, (224 // 16) ** 2 + 1, 192

    def array(nbytes: int, key: str) -> int:  # an array on the wire: data, header, key
        return nbytes + NPY_HEADER + len(key)

    none = rows["none-s43422"]
    act = array(b * n * d * 4, "f:act")
    labels = array(b, "y")  # uint8
    assert (int(none["tokens"]), int(none["hidden"])) == (n, d)
    assert int(none["step_up_act"]) == int(none["step_down_grad"]) == act
    assert int(none["step_up_targets"]) == labels
    assert int(none["step_bytes"]) == 2 * act + labels == 38_732_299
    short = 50_000 - 390 * b  # the epoch's last batch
    assert int(none["last_batch"]) == short == 80
    assert int(none["last_step_bytes"]) == 2 * array(short * n * d * 4, "f:act") + array(short, "y")
    assert int(none["steps_per_epoch"]) == 391
    assert int(none["front_params"]) == 1_520_256  # embeddings + 3 blocks
    assert 1_520_256 * 4 < int(none["sync_bytes"]) < 1_520_256 * 4 + 52 * 200  # 52 arrays
    # 10 epochs and one round's sync down and up: the budget is spent by the front's upload
    epochs = 10 * (390 * int(none["step_bytes"]) + int(none["last_step_bytes"]))
    assert int(none["total_bytes"]) == epochs + 2 * int(none["sync_bytes"])
    assert round(int(none["total_bytes"]) / 1e6, 1) == 151_310.2
    assert (none["stop_reason"], int(none["steps"]), int(none["rounds"])) == ("budget-mb", 3910, 1)
    assert int(none["budget_steps"]) == 3910 and int(none["step_cap"]) == 150 * 3910

    topk = rows["topk-c0.01-s43422"]
    k = int(0.01 * 4 * n * d / 6)  # values + uint16 indices cost 6 B an element
    values = array(b * k * 4, "f:values")
    up = values + array(b * k * 2, "i:idx") + array(2, "i:shape") + labels  # shape (2,) uint8
    assert int(topk["step_bytes"]) == up + values == 323_359  # gradients: the values' only
    adc = rows["adc-c0.01-s43422"]
    t, kept = int(0.1 * b), int(0.1 * n)  # clusters, tokens: xi_b = xi_t = sqrt(0.01)
    act = array(t * kept * d * 4, "f:act")
    assert int(adc["step_bytes"]) == 2 * act + array(t * 100, "ys") == 351_804
    for row in (topk, adc):  # the budget, not the cap, stops even the cheapest points
        assert row["stop_reason"] == "budget-mb"
        assert int(row["steps"]) == int(row["budget_steps"]) < int(row["step_cap"])
        # the bytes the budget buys, over a step's (sync: once a round of 3,910 steps)
        per_step = int(row["step_bytes"]) + 2 * int(row["sync_bytes"]) / 3910
        assert int(row["steps"]) == pytest.approx(151_310e6 / per_step, rel=2e-3)
        assert int(row["total_bytes"]) / 1e6 >= 151_310
    assert int(rows["topk-c0.01-s43422"]["steps"]) == 463_913  # the header's numbers
    assert int(rows["adc-c0.01-s43422"]["steps"]) == 426_670
    assert any(line.startswith("total: 3 points") for line in lines)
    assert "n = 197 tokens of d = 192" in "\n".join(lines)


def test_a_hub_model_offline_without_a_stand_in_is_one_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["paper_deit_cifar100", "--train-size", "50000", "--num-classes", "100"]
    assert plan.main([*argv, "--only", "name=none-s51"]) == 2
    err = capsys.readouterr().err
    assert "hf:facebook/deit-tiny-patch16-224" in err and "--model" in err


def test_a_dataset_that_does_not_load_asks_for_its_size(
    deit_tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["paper_deit_cifar100", "--model", str(deit_tiny_config), "--only", "name=none-s51"]
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert "hf:uoft-cs/cifar100" in err and "--train-size" in err and "--num-classes" in err


def test_a_run_of_several_clients_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan.main(["non_iid", "--train-size", "100", "--num-classes", "10"]) == 2
    assert "one client" in capsys.readouterr().err


# ---- the schedule, by hand --------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget_mb", "expected"),
    [
        # rounds of 3 steps over an epoch of [10, 10, 4] bytes, fronts of 100 each way
        (0.0, step_costs.Schedule(9, 3, "num-server-rounds", 3 * 200 + 3 * 24)),
        # spent in round 2's second step (224 + 100 + 10 + 10 = 344 >= 336): the front goes up
        (336e-6, step_costs.Schedule(5, 2, "budget-mb", 344 + 100)),
        # spent by round 1's front going up (224): round 2 does not start
        (224e-6, step_costs.Schedule(3, 1, "budget-mb", 224)),
        # exactly on a step's last byte
        (110e-6, step_costs.Schedule(1, 1, "budget-mb", 210)),
    ],
)
def test_the_schedule_books_as_the_engine_does(
    budget_mb: float, expected: step_costs.Schedule
) -> None:
    assert step_costs.schedule([10, 10, 4], 100, 3, 3, budget_mb) == expected


def test_an_epoch_a_round_when_local_steps_is_zero() -> None:
    assert step_costs.epoch_batches(50, 16) == [16, 16, 16, 2]  # a remainder of 2 is kept,
    assert step_costs.epoch_batches(49, 16) == [16, 16, 16]  # of 1 dropped (the cursor's rule)
    assert step_costs.schedule([5, 5, 1], 0, 0, 2, 0.0) == step_costs.Schedule(
        6, 2, "num-server-rounds", 22
    )


# ---- the plan against real runs -----------------------------------------------------------


def test_the_plan_is_what_the_runs_book(tmp_path: Path) -> None:
    """Two points of paper_deit_cifar100 on a tiny checkpoint and parquet set (60 train
    images: epochs of 16, 16, 16, 12; rounds of 3 steps, so round 2 starts on the short
    batch) with budgets that stop one by its front's upload between rounds (BottleNet++,
    which syncs its encoder with the front) and one in a step of round 2 (C3-SL at R = 8,
    whose short batch is padded and carries an extra ``valid`` array): the plan's steps,
    rounds, stop and bytes are the runs' own, to the byte."""
    experiment = load_experiment("paper_deit_cifar100", check_points=False)
    model = str(save_tiny_vit(tmp_path / "vit", image_size=16, patch_size=4))
    parquet = save_parquet_images(tmp_path / "pq", side=16)
    common = {"model": model, "dataset": parquet, "batch-size": 16, "local-steps": 3}
    common |= {"num-server-rounds": 3, "eval-every": 0, "eval-samples": 8, "augment": "none"}
    names = ("bottlenet-c0.2-s51", "c3sl-r8-s51")
    points = [
        dataclasses.replace(p, run_config=p.run_config | common | {"budget-mb": 0.0})
        for p in experiment.points
        if p.name in names
    ]
    free = {p.point.name: p for p in plan.plan_points(experiment, points)}  # no budget
    c3sl, bottlenet = free["c3sl-r8-s51"], free["bottlenet-c0.2-s51"]
    assert c3sl.planned == step_costs.Schedule(9, 3, "num-server-rounds", c3sl.planned.total_bytes)
    assert c3sl.last is not None and (c3sl.full.batch, c3sl.last.batch) == (16, 12)
    assert bottlenet.sync_bytes > c3sl.sync_bytes  # the encoder goes with the front
    budgets = {  # MB: half a front short of round 1's end / 1.5 full steps into round 2
        bottlenet.point.name: (2 * bottlenet.sync_bytes + 3 * bottlenet.full.total) / 1e6
        - bottlenet.sync_bytes / 2e6,
        c3sl.point.name: (3 * c3sl.sync_bytes + 4.5 * c3sl.full.total) / 1e6,
    }
    points = [
        dataclasses.replace(p, run_config=p.run_config | {"budget-mb": budgets[p.name]})
        for p in points
    ]
    planned = {p.point.name: p.planned for p in plan.plan_points(experiment, points)}
    assert (planned[bottlenet.point.name].steps, planned[bottlenet.point.name].rounds) == (3, 1)
    assert (planned[c3sl.point.name].steps, planned[c3sl.point.name].rounds) == (5, 2)

    experiment = dataclasses.replace(experiment, points=points)
    results = run_sweep(experiment, results_root=tmp_path / "results", progress=lambda _: None)
    assert len(results) == 2
    for result in results:
        assert result.status == "completed", result.error
        summary: dict[str, Any] = result.summary
        expected = planned[result.point.name]
        booked = sum(
            summary[k]
            for k in ("bytes_up_act", "bytes_up_targets", "bytes_down_grad", "bytes_model_sync")
        )
        steps = summary["history"][-1]["steps"]
        assert (booked, steps, summary["rounds"], summary["stop_reason"]) == (
            expected.total_bytes,
            expected.steps,
            expected.rounds,
            expected.stop_reason,
        ), result.point.name


def test_npy_header_assumption() -> None:
    """The header arithmetic above: a small array's npy header is 128 bytes."""
    for shape in [(128, 197, 192), (128,), (2,), (12, 100)]:
        assert npy_header_nbytes(np.dtype(np.float32), shape) == NPY_HEADER
