"""collect on a sweep whose files were damaged after it ran (deleted, binary, truncated):
one line naming the file, and table.csv, the tidy tables and the pivot hold the same points
(docs/sweeps.md, "A damaged point")."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import RunConfig
from adc_flwr.run.files import atomic_write_text
from adc_flwr.run.run_dir import PARTITIONS_FILE, RunDir
from adc_flwr.run.summary import make_summary
from simulations import collect as collect_module
from simulations.collect import TABLE_FILE, collect, pivot
from simulations.studies import TableError, load_study

# two methods, two seeds each: every point of the pivot has 2 seeds
POINTS = {"none-s1": ("none", 1, 0.5), "none-s2": ("none", 2, 0.6)} | {
    "adc-s1": ("adc", 1, 0.4),
    "adc-s2": ("adc", 2, 0.45),
}
TRAFFIC = {
    "bytes_up_act": 2000,
    "bytes_up_targets": 100,
    "bytes_down_grad": 2000,
    "bytes_model_sync": 0,
    "compression_ratio": 1.0,
}


def write_point(folder: Path, name: str, method: str, seed: int, accuracy: float) -> None:
    """One completed point as a run writes it (the real writers), 2 steps, 1 evaluation."""
    extra = {"compression": 0.25} if method == "adc" else {}
    cfg = RunConfig.from_run_config(
        {"dataset": "digits", "method": method, "seed": seed, **extra}
        | {"out-dir": str(folder), "run-name": name}
    )
    with RunDir(cfg.run_dir) as run:
        run.write_config(cfg.to_run_config())
        for step in (1, 2):
            run.append_metrics({"kind": "step", "round": 1, "step": step, "train_loss": 1.0})
        run.append_metrics(
            {"kind": "eval", "round": 1, "step": 2, "test_accuracy": accuracy, "test_loss": 0.9}
            | TRAFFIC
            | {"wall_time_s": 1.0, "sim_time_s": 3.0}
        )
        run.append_clients(
            [
                {"round": 1, "partition": p, "profile": "wifi", "xi": 1.0, "outcome": "finished"}
                for p in (0, 1)
            ]
        )
        atomic_write_text(run.path / PARTITIONS_FILE, "partition_id,0,1,total\n0,3,2,5\n1,1,4,5\n")
        run.write_summary(
            make_summary(
                "completed",
                "num-server-rounds",
                test_accuracy=accuracy,
                test_loss=0.9,
                rounds=1,
                wall_time_s=1.0,
                sim_time_s=3.0,
                **TRAFFIC,
            )
        )


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    folder = tmp_path / "exp"
    for name, (method, seed, accuracy) in POINTS.items():
        write_point(folder, name, method, seed, accuracy)
    return folder


def binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def header_only(path: Path) -> None:
    path.write_text(path.read_text().splitlines()[0][:20] + "\n")


def without_evaluations(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("eval,")))


# file -> how it is damaged; every one leaves point adc-s2 out of every table
DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "metrics-deleted": ("metrics.csv", Path.unlink, "missing"),
    "metrics-binary": ("metrics.csv", binary, "not UTF-8"),
    "metrics-truncated": ("metrics.csv", truncate, "cut short"),
    "metrics-header": ("metrics.csv", header_only, "no column"),
    "metrics-no-eval": ("metrics.csv", without_evaluations, "no evaluation row"),
    "clients-binary": ("clients.csv", binary, "not UTF-8"),
    "clients-deleted": ("clients.csv", Path.unlink, "missing"),
    "partitions-binary": ("partitions.csv", binary, "not UTF-8"),
    "summary-damaged": ("summary.json", truncate, "not valid JSON"),
    "summary-binary": ("summary.json", binary, "not UTF-8"),
    "config-damaged": ("config.json", truncate, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_damaged_point_is_named_and_left_out_of_every_table(
    case: str, sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, damage, reason = DAMAGES[case]
    path = sweep / "adc-s2" / name
    damage(path)
    assert collect_module.main([str(sweep)]) == 1  # the tables are written, the point is not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
    assert reason in err[0] and "adc-s2" in err[0] and "damaged" in err[0]
    table = pd.read_csv(sweep / TABLE_FILE).set_index("run")
    assert table.loc["adc-s2", "status"] == "damaged"
    assert str(path) in table.loc["adc-s2", "error"]
    assert (table.drop(index="adc-s2")["status"] == "completed").all()
    completed = set(table.index[table["status"] == "completed"])
    for tidy in ("evals", "clients", "partitions"):
        for suffix, read in ((".csv", pd.read_csv), (".parquet", pd.read_parquet)):
            assert set(read(sweep / f"{tidy}{suffix}")["run"]) == completed, (tidy, suffix)
    # the pivot counts the seeds the figures have: adc's one left, none's two
    counts = pivot(table.reset_index(), aggfunc="count")
    assert (counts.loc["adc", 0.25], counts.loc["none", 1.0]) == (1, 2)
    evals = pd.read_csv(sweep / "evals.csv")
    assert evals.groupby("method")["seed"].nunique().to_dict() == {"adc": 1, "none": 2}
    study = load_study(sweep)  # and the notebooks read tables that agree
    assert set(study.completed["run"]) == set(study.evals["run"]) == completed


def test_an_intact_sweep_collects_with_status_0(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert collect_module.main([str(sweep)]) == 0
    assert capsys.readouterr().err == ""
    table = pd.read_csv(sweep / TABLE_FILE)
    assert set(table["status"]) == {"completed"} and list(table["steps"]) == [2, 2, 2, 2]
    assert pivot(table, aggfunc="count").stack().dropna().tolist() == [2, 2]


def test_a_summary_the_sweep_recorded_completed_but_was_deleted_is_damaged(sweep: Path) -> None:
    record = {"points": list(POINTS), "results": {n: {"status": "completed"} for n in POINTS}}
    (sweep / "sweep.json").write_text(json.dumps(record))
    (sweep / "none-s1" / "summary.json").unlink()
    table = collect(sweep).set_index("run")
    assert table.loc["none-s1", "status"] == "damaged"
    assert "summary.json: missing" in table.loc["none-s1", "error"]
    assert "none-s1" not in set(pd.read_csv(sweep / "evals.csv")["run"])


def test_a_damaged_sweep_json_is_one_line(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (sweep / "sweep.json").write_bytes(b"\x00\xff{")
    assert collect_module.main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {sweep / 'sweep.json'}"), err


def test_an_unreadable_metrics_file_of_a_failed_point_is_named(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RunDir(sweep / "adc-s1")
    run.write_summary(make_summary("failed", error="the loss diverged"))
    binary(run.metrics_path)
    assert collect_module.main([str(sweep)]) == 1
    err = capsys.readouterr().err
    assert f"error: {run.metrics_path}: " in err
    row = pd.read_csv(sweep / TABLE_FILE).set_index("run").loc["adc-s1"]
    assert row["status"] == "damaged" and "the loss diverged" in row["error"]


# ---- the notebooks' loader --------------------------------------------------------------


@pytest.fixture
def tables(sweep: Path, tmp_path: Path) -> Path:
    """The sweep's collected tables without its run directories, as they ship."""
    collect(sweep)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in sweep.iterdir():
        if path.is_file() and path.name != "sweep.json":
            shutil.copy(path, shipped / path.name)
    return shipped


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("evals.csv", truncate, "cut short"),
        ("evals.csv", header_only, "no column"),
        ("evals.csv", binary, "not UTF-8"),
        ("clients.csv", header_only, "no column"),
        ("evals.parquet", truncate, "cannot be read"),
        ("table.csv", header_only, "no column"),
        ("table.csv", binary, "not UTF-8"),
    ],
)
def test_load_study_names_a_damaged_table(
    tables: Path, name: str, damage: Callable[[Path], None], reason: str
) -> None:
    if name.endswith(".csv"):  # the csv is what is read when there is no parquet
        (tables / name.replace(".csv", ".parquet")).unlink(missing_ok=True)
    damage(tables / name)
    with pytest.raises(TableError) as info:
        load_study(tables)
    message = str(info.value)
    assert message.startswith(f"{tables / name}: ") and reason in message
    assert "\n" not in message


def test_load_study_refuses_tables_that_disagree_on_their_points(tables: Path) -> None:
    """What collect wrote before: a completed run in table.csv with no evaluations."""
    for suffix in (".csv", ".parquet"):
        path = tables / f"evals{suffix}"
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        frame = frame[frame["run"] != "adc-s2"]
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    with pytest.raises(TableError, match=r"evals\.parquet: .*adc-s2.*table\.csv"):
        load_study(tables)


def test_the_cli_on_a_damaged_shipped_table_is_one_line(
    tables: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary(tables / TABLE_FILE)
    assert collect_module.main([str(tables)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tables / TABLE_FILE}: "), err
