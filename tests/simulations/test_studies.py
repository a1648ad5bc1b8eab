"""The sweep's tidy tables and what the study notebooks compute from them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr_datasets.metrics import compute_counts

from adc_flwr.config import RunConfig
from adc_flwr.data import label_counts, load_data, run_partitions
from adc_flwr.run.run_dir import RunDir
from simulations import collect as collect_module
from simulations.collect import collect
from simulations.studies import (
    SHIPPED,
    client_time,
    federated_spread,
    label_partitioner,
    links_of,
    links_runs,
    load_study,
    not_stopped_by,
    outcome_counts,
    point_label,
    reach_target,
    seed_curves,
)
from simulations.tables import client_rounds, partition_counts

# ---- the tidy tables of a real sweep --------------------------------------------------


def completed_runs(folder: Path) -> list[RunDir]:
    return [
        RunDir(p)
        for p in sorted(folder.iterdir())
        if (p / "summary.json").is_file()
        and (RunDir(p).read_summary() or {}).get("status") == "completed"
    ]


def test_clients_table_is_every_completed_runs_clients_csv(studies_sweep: Path) -> None:
    table = pd.read_parquet(studies_sweep / "clients.parquet")
    assert len(pd.read_csv(studies_sweep / "clients.csv")) == len(table)
    runs = completed_runs(studies_sweep)
    assert sorted(table["run"].unique()) == sorted(r.path.name for r in runs)
    for run in runs:
        mine = table[table["run"] == run.path.name].reset_index(drop=True)
        own = run.read_clients()
        assert len(mine) == len(own) > 0
        for column in ("round", "partition", "bytes_up", "compute_s", "outcome"):
            assert list(mine[column]) == list(own[column]), (run.path.name, column)
        config = run.read_config() or {}
        assert set(mine["seed"]) == {config["seed"]} and set(mine["alpha"]) == {config["alpha"]}
    # the deadline cut clients as stragglers, the edge mix dropped some out
    assert {"finished", "straggler"} <= set(table["outcome"])


def test_clients_xi_is_the_level_the_client_used(studies_sweep: Path) -> None:
    table = pd.read_parquet(studies_sweep / "clients.parquet")
    by_method = table.groupby("method")["xi"]
    assert by_method.apply(lambda s: s.isna().all())["none"]
    assert set(by_method.unique()["adc"]) == {0.25}
    assert set(by_method.unique()["quant"]) == {8 / 32}  # quant-bits, not `compression`


def test_partitions_table_holds_each_runs_partitions(studies_sweep: Path) -> None:
    table = pd.read_parquet(studies_sweep / "partitions.parquet")
    for run in completed_runs(studies_sweep):
        cfg = RunConfig.from_run_config(run.read_config() or {})
        data = load_data(cfg.dataset)
        expected = label_counts(data.train.labels, list(run_partitions(cfg, 4)), 10)
        mine = table[table["run"] == run.path.name].pivot(
            index="partition_id", columns="label", values="count"
        )
        assert mine.to_numpy().tolist() == expected.drop(columns="total").to_numpy().tolist()
        assert mine.to_numpy().sum() == len(data.train.labels)  # Dirichlet covers all


def test_label_partitioner_reproduces_the_recorded_counts(studies_sweep: Path) -> None:
    table = pd.read_parquet(studies_sweep / "partitions.parquet")
    run = table["run"].iloc[0]
    partitioner = label_partitioner(table, run)
    assert partitioner.num_partitions == 4
    counts = compute_counts(partitioner, "label")
    mine = table[table["run"] == run].pivot(index="partition_id", columns="label", values="count")
    assert counts.to_numpy().tolist() == mine.to_numpy().tolist()


def test_collect_leaves_tables_without_runs_alone(
    studies_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shipped results hold the tables, not the run directories they came from."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for table in studies_sweep.glob("*.*"):
        if table.is_file() and table.name != "sweep.json":
            shutil.copy(table, shipped / table.name)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    with pytest.raises(FileNotFoundError, match="no run directories"):
        collect(shipped)
    assert collect_module.main([str(shipped)]) == 0  # prints the shipped table's pivot
    assert "holds no run directories" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    assert collect_module.main([str(tmp_path / "nothing")]) == 2
    study = load_study(shipped)  # and the notebooks can read them
    assert len(study.table) == 12 and not study.clients.empty and not study.partitions.empty


def test_tidy_tables_of_an_empty_sweep_have_their_columns(tmp_path: Path) -> None:
    assert "fed_accuracy" in client_rounds(tmp_path).columns
    assert list(partition_counts(tmp_path).columns)[-3:] == ["partition_id", "label", "count"]


def test_attach_brings_config_keys_the_table_lacks(studies_sweep: Path) -> None:
    study = load_study(studies_sweep)
    assert "dataset" not in study.clients.columns  # not swept
    attached = study.attach(study.clients, ["dataset", "batch-size"])
    assert set(attached["dataset"]) == {"digits"} and set(attached["batch-size"]) == {16}
    assert len(attached) == len(study.clients)
    with pytest.raises(KeyError, match="not-a-key"):
        study.attach(study.clients, ["not-a-key"])


# ---- the computations, by hand ----------------------------------------------------------


def evals_frame() -> pd.DataFrame:
    """Two seeds of one point, one of another; the last evaluations fall on other steps."""
    rows = [
        # run, point, step, accuracy, MB, simulated s
        ("a-s1", "adc 0.1", 10, 0.20, 1.0, 5.0),
        ("a-s1", "adc 0.1", 20, 0.45, 2.0, 10.0),
        ("a-s1", "adc 0.1", 23, 0.55, 2.3, 11.5),
        ("a-s2", "adc 0.1", 10, 0.30, 1.2, 6.0),
        ("a-s2", "adc 0.1", 20, 0.52, 2.2, 11.0),
        ("a-s2", "adc 0.1", 21, 0.51, 2.3, 11.6),
        ("n-s1", "none", 10, 0.40, 9.0, 30.0),
    ]
    return pd.DataFrame(
        rows, columns=["run", "point", "step", "test_accuracy", "mb_total", "sim_time_s"]
    )


def test_seed_curves_pair_the_kth_evaluations() -> None:
    curves = seed_curves(evals_frame().sample(frac=1, random_state=0), "mb_total")
    adc = curves[curves["point"] == "adc 0.1"].set_index("k")
    assert list(adc.index) == [0, 1, 2] and set(adc["seeds"]) == {2}
    assert adc.loc[0, "test_accuracy_mean"] == pytest.approx(0.25)
    assert adc.loc[0, "test_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert adc.loc[2, "mb_total_mean"] == pytest.approx(2.3)
    assert adc.loc[1, "mb_total_mean"] == pytest.approx(2.1)
    none = curves[curves["point"] == "none"]
    assert len(none) == 1 and math.isnan(none["test_accuracy_std"].iloc[0])


def test_reach_target_takes_each_runs_first_evaluation_at_the_target() -> None:
    reach = reach_target(evals_frame(), 0.5).set_index("point")
    adc = reach.loc["adc 0.1"]
    assert (adc["reached"], adc["seeds"]) == (2, 2)
    # s1 first reaches 0.5 at step 23 (2.3 MB), s2 at step 20 (2.2 MB): not its later dip
    assert adc["mb_total_mean"] == pytest.approx(2.25)
    assert adc["step_mean"] == pytest.approx(21.5)
    assert adc["sim_time_s_std"] == pytest.approx(np.std([11.5, 11.0], ddof=1))
    none = reach.loc["none"]
    assert (none["reached"], none["seeds"]) == (0, 1) and math.isnan(none["mb_total_mean"])


def test_client_time_and_outcomes_count_what_trained() -> None:
    clients = pd.DataFrame(
        {
            "point": ["adc 0.1"] * 4,
            "profile": ["iot", "iot", "iot", "fibre"],
            "xi": [0.1, 0.1, 0.1, 0.1],
            "compute_s": [4.0, 2.0, 9.0, 0.5],
            "transfer_s": [30.0, 10.0, 99.0, 0.25],
            "outcome": ["finished", "finished", "dropped-out", "finished"],
            "round": [1, 1, 1, 1],
            "run": ["r"] * 4,
            "partition": [0, 1, 2, 3],
            "fed_accuracy": [0.5, np.nan, np.nan, 0.7],
        }
    )
    times = client_time(clients).set_index("profile")
    assert times.loc["iot", "client_rounds"] == 2  # the drop-out is not a trained round
    assert times.loc["iot", "compute_s"] == pytest.approx(3.0)
    assert times.loc["iot", "transfer_s"] == pytest.approx(20.0)
    counts = outcome_counts(clients)
    assert counts.loc["adc 0.1", "dropped-out"] == 1 and counts.loc["adc 0.1", "finished"] == 3
    spread = federated_spread(clients)
    assert sorted(spread["fed_accuracy"]) == [0.5, 0.7]


def test_point_labels_name_the_knob() -> None:
    assert point_label(pd.Series({"method": "none", "level": 1.0})) == "none"
    assert point_label(pd.Series({"method": "adc", "level": 0.1})) == "adc 0.1"
    quant = pd.Series({"method": "quant", "level": 3 / 32, "quant-bits": 3})
    assert point_label(quant) == "quant 3 bit"
    assert point_label(pd.Series({"method": "c3sl", "level": 0.125, "c3sl-r": 8})) == "c3sl R=8"
    adaptive = pd.Series({"method": "adc", "level": 0.25, "adaptive-compression": True})
    assert point_label(adaptive) == "adc adaptive"


def test_not_stopped_by_flags_other_stops_and_unfinished_runs() -> None:
    table = pd.DataFrame(
        {
            "run": ["a", "b", "c"],
            "status": ["completed", "completed", "failed"],
            "stop_reason": ["budget-mb", "num-server-rounds", None],
        }
    )
    assert list(not_stopped_by(table, "budget-mb")["run"]) == ["b", "c"]


# ---- the shipped results ----------------------------------------------------------------


def test_shipped_paper_comparison_is_budget_matched() -> None:
    """Every point ran three seeds to the budget: the step cap stopped none of them."""
    table = load_study(SHIPPED / "paper_comparison").table
    assert set(table["status"]) == {"completed"}
    assert set(table["stop_reason"]) == {"budget-mb"}
    per_point = table.groupby(["method", "level"])["seed"].nunique()
    assert set(per_point) == {3} and len(per_point) == 13
    assert (table["mb_total"] >= 60).all() and (table["mb_total"] < 62).all()


@pytest.mark.parametrize(
    "folder", ["paper_comparison", "non_iid", "edge_mix", "edge_deadlines", "edge_traces"]
)
def test_shipped_tables_are_complete(folder: str) -> None:
    study = load_study(SHIPPED / folder)
    assert set(study.table["status"]) == {"completed"}
    assert set(study.evals["run"]) == set(study.table["run"])
    if folder != "paper_comparison":
        assert set(study.clients["run"]) == set(study.table["run"])


def test_edge_traces_compares_each_point_on_both_links() -> None:
    runs = links_runs(load_study(SHIPPED / "edge_traces"))
    assert links_of("simulations/experiments/traces/edge_traced.csv") == "traced"
    assert links_of(float("nan")) == "mix" and links_of("my/devices.csv") == "devices"
    per_point = runs.groupby(["point", "links"])["seed"].nunique()
    assert set(per_point) == {3} and set(runs["links"]) == {"static", "traced"}
    assert (runs["energy_j"] > 0).all() and (runs["energy_max_client_j"] > 0).all()
