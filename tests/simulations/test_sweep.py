"""Named experiments: grid expansion, validation, the in-process sweep, and collect."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flwr.common.config import parse_config_args

from adc_flwr.compression import available_methods
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from simulations import sweep
from simulations.collect import (
    ENERGY_RESULT_COLUMNS,
    RESULT_COLUMNS,
    TABLE_FILE,
    collect,
    curves,
    markdown_pivot,
    over_seeds,
)
from simulations.experiments import (
    EXPERIMENTS_DIR,
    ExperimentError,
    load_experiment,
    point_name,
    select,
    validate_points,
)
from simulations.sweep import main
from tests.support.hub_standins import processor_kwargs, save_parquet_images, save_tiny_vit

BASE = """
[base]
dataset = "digits"
batch-size = 16
num-server-rounds = 1
local-steps = 2
eval-samples = 32
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- expansion and names --------------------------------------------------------------


def test_product_within_a_table_union_across_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
[[grid]]
method = ["adc", "topk"]
compression = [0.1, 0.5]

[[grid]]
method = ["c3sl"]
c3sl-r = [2, 4]

[[grid]]
method = ["none"]
""",
    )
    exp = load_experiment(path, check_points=False)
    assert [p.name for p in exp.points] == [
        "adc-c0.1",
        "adc-c0.5",
        "topk-c0.1",
        "topk-c0.5",
        "c3sl-r2",
        "c3sl-r4",
        "none",
    ]
    assert [p.table for p in exp.points] == [0, 0, 0, 0, 1, 1, 2]
    topk = exp.points[3]
    assert topk.swept == {"method": "topk", "compression": 0.5}
    assert topk.run_config["dataset"] == "digits" and topk.run_config["compression"] == 0.5
    cfg = topk.config(tmp_path / "out")
    assert cfg.run_dir == (tmp_path / "out" / "topk-c0.5").resolve()
    assert exp.nodes == 1 and exp.name == "exp"
    # deterministic: loading again gives the same points, in the same order
    assert load_experiment(path, check_points=False).points == exp.points


def test_point_names() -> None:
    assert point_name({"compression": 0.1}, {"method": "adc"}) == "adc-c0.1"
    assert point_name({"method": "quant", "quant-bits": 3}) == "quant-b3"
    assert point_name({"pooling": "cls"}, {"method": "adc"}) == "adc-pool-cls"
    assert point_name({"method": "none", "lr": 0.0001}) == "none-lr0.0001"
    assert point_name({"method": "adc", "snr-db": "-10,10"}) == "adc-snr-db-10_10"
    assert point_name({}) == RunConfig.method  # nothing swept: the default method


def test_linked_keys_sweep_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
method = "adc"
[[grid]]
"batch-compression,token-compression" = [[0.5, 0.2], [1.0, 0.1]]
pooling = ["attention", "mean"]
""",
    )
    points = load_experiment(path, check_points=False).points
    assert [p.name for p in points] == [
        "adc-xb0.5-xt0.2-pool-attention",
        "adc-xb0.5-xt0.2-pool-mean",
        "adc-xb1-xt0.1-pool-attention",
        "adc-xb1-xt0.1-pool-mean",
    ]
    assert points[2].config("x").compression_split == (1.0, 0.1)

    bad = write(tmp_path, BASE + '[[grid]]\n"batch-compression,token-compression" = [0.5]\n')
    with pytest.raises(ExperimentError, match=r"must be a list of 2 values"):
        load_experiment(bad, check_points=False)


def test_duplicates_and_name_collisions_are_rejected(tmp_path: Path) -> None:
    same_twice = write(
        tmp_path,
        BASE + '[[grid]]\nmethod = ["adc"]\n[[grid]]\nmethod = ["none", "adc"]\n',
        "dup.toml",
    )
    with pytest.raises(ExperimentError, match=r"duplicate point 'adc' \(grid tables 1 and 2\)"):
        load_experiment(same_twice, check_points=False)
    # defaults count: compression = 0.1 is the default, so these two are the same run
    default = write(
        tmp_path,
        BASE + '[[grid]]\nmethod = ["adc"]\ncompression = [0.1]\n'
        '[[grid]]\nmethod = ["adc"]\ncompression = [0.1, 0.1]\n',
        "dup2.toml",
    )
    with pytest.raises(ExperimentError, match=r"duplicate point 'adc-c0\.1'"):
        load_experiment(default, check_points=False)
    # 0.1 and 0.1000001 print alike but are different runs: the names would collide
    collide = write(
        tmp_path, BASE + '[[grid]]\nmethod = ["adc"]\ncompression = [0.1, 0.1000001]\n', "c.toml"
    )
    with pytest.raises(ExperimentError, match=r"different points share the run name 'adc-c0\.1'"):
        load_experiment(collide, check_points=False)


# ---- validation -----------------------------------------------------------------------


def test_validation_error_names_file_point_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["adc"]\ncompression = [0.1, 5.0]\n')
    with pytest.raises(ExperimentError) as err:
        load_experiment(path, check_points=False)
    message = str(err.value)
    assert str(path) in message
    assert "point 2/2 'adc-c5' (grid table 1)" in message
    assert "'compression' = 5.0" in message and "allowed range" in message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[[grid]]\ncompresion = [0.1]\n", r"unknown key 'compresion' \(did you mean 'compr"),
        ('[[grid]]\nmethod = "adc"\n', r"'method' must be a non-empty list"),
        ("[[grid]]\nmethod = []\n", r"'method' must be a non-empty list"),
        ('[[grid]]\nrun-name = ["x"]\n', r"'run-name' is set by the sweep"),
        ("", r"needs at least one \[\[grid\]\] table"),
        ('[sweep]\nnodes = 0\n[[grid]]\nmethod = ["adc"]\n', r"nodes = 0 must be an integer"),
        ('[sweep]\nrepeat = 2\n[[grid]]\nmethod = ["adc"]\n', r"\[sweep\]: unknown key 'repeat'"),
        ('[grids]\nmethod = ["adc"]\n', r"unknown table\(s\) \['grids'\]"),
    ],
)
def test_malformed_files_fail_with_the_culprit(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, BASE + text)
    with pytest.raises(ExperimentError, match=pattern):
        load_experiment(path, check_points=False)


def test_base_out_dir_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'out-dir = "x"\n[[grid]]\nmethod = ["adc"]\n')
    with pytest.raises(ExperimentError, match=r"\[base\]: 'out-dir' is set by the sweep"):
        load_experiment(path, check_points=False)


def test_points_get_every_run_check_before_running(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["none", "nope"]\n')
    with pytest.raises(ExperimentError, match=r"point 2/2 'nope'.*'method' = 'nope': allowed"):
        load_experiment(path)
    exp = load_experiment(path, check_points=False)  # config-only validation passes
    validate_points(exp, exp.points[:1], nodes=1)  # and the registered method alone is fine
    # what needs the model or the data: the split index, the partitioning over the nodes
    deep = write(tmp_path, BASE + '[[grid]]\nmethod = ["none"]\nsplit-index = [3, 9]\n', "d.toml")
    with pytest.raises(ExperimentError, match=r"point 2/2 'none-l9'.*split-index must be in"):
        load_experiment(deep)
    dirichlet = BASE + 'partitioner = "dirichlet"\nmin-partition-size = 400\n'
    many = write(tmp_path, dirichlet + '[[grid]]\nmethod = ["none"]\n', "m.toml")
    exp = load_experiment(many, check_points=False)
    with pytest.raises(ExperimentError, match=r"min-partition-size=400"):
        validate_points(exp, exp.points, nodes=8)


@pytest.mark.skipif("c3sl" not in available_methods(), reason="c3sl not registered yet")
def test_method_specific_errors_surface_before_running(tmp_path: Path) -> None:
    """C3-SL groups the batch in R: batch-size 16 cannot be grouped by 3."""
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["c3sl"]\nc3sl-r = [2, 3]\n')
    expected = r"point 2/2 'c3sl-r3'.*C3-SL: 'batch-size' = 16 must be a multiple"
    with pytest.raises(ExperimentError, match=expected):
        load_experiment(path)


@pytest.fixture(scope="module")
def hub_standins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Local stand-ins for ``hf:`` models and datasets (a 12-block checkpoint with an image
    processor, a parquet set), so validating shipped experiments never downloads."""
    import datasets

    root = tmp_path_factory.mktemp("hub-standins")
    standins = {
        "model": str(save_tiny_vit(root / "vit", layers=12, processor=processor_kwargs())),
        "dataset": save_parquet_images(root / "pq"),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-cache")
        yield standins


@pytest.mark.parametrize("path", sorted(EXPERIMENTS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiments_are_valid(path: Path, hub_standins: dict[str, str]) -> None:
    exp = load_experiment(path, check_points=False)
    assert exp.points and exp.description
    # every check on every point; only hub ids (not reachable from tests) become stand-ins
    points = [
        dataclasses.replace(
            p,
            run_config=p.run_config
            | {k: v for k, v in hub_standins.items() if str(p.run_config.get(k)).startswith("hf:")},
        )
        for p in exp.points
    ]
    exp = dataclasses.replace(exp, points=points)
    validate_points(exp, exp.points, exp.nodes)


def test_paper_sweep_covers_the_paper_levels_at_one_budget() -> None:
    exp = load_experiment("paper_sweep", check_points=False)
    cfgs = [p.config("x") for p in exp.points]
    assert exp.nodes == 1
    assert {c.dataset for c in cfgs} == {"fashion-mnist"} and {c.model for c in cfgs} == {"vit-cpu"}
    assert len({(c.budget_mb, c.num_server_rounds * c.local_steps, c.seed) for c in cfgs}) == 1
    levels = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    for method in ("adc", "topk", "random-topk", "bottlenet"):
        assert sorted(c.compression for c in cfgs if c.method == method) == levels
    assert sorted(c.c3sl_r for c in cfgs if c.method == "c3sl") == [2, 4, 8, 16, 32]
    assert all(c.batch_size % c.c3sl_r == 0 for c in cfgs if c.method == "c3sl")
    assert sorted(c.quant_bits for c in cfgs if c.method == "quant") == [
        max(1, round(32 * c)) for c in levels
    ]
    assert {c.method for c in cfgs} == {
        "none",
        "adc",
        "topk",
        "random-topk",
        "c3sl",
        "bottlenet",
        "quant",
        "pq",
    }


def test_select_filters_points() -> None:
    points = load_experiment("paper_sweep", check_points=False).points
    names = [p.name for p in select(points, ["method=adc,none", "compression=0.10"])]
    assert names == ["adc-c0.1", "none"]  # none has the default compression 0.1
    assert [p.name for p in select(points, ["name=c3sl-r*"])][-1] == "c3sl-r32"
    assert len(select(points, ["quant-bits=3"])) == 1
    with pytest.raises(ExperimentError, match="unknown key 'metod'"):
        select(points, ["metod=adc"])
    with pytest.raises(ExperimentError, match="expected key=value"):
        select(points, ["adc"])


# ---- running --------------------------------------------------------------------------


def test_dry_run_lists_points_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["smoke", "--dry-run", "--results-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 points" in out
    assert "[1/2] none" in out and "[2/2] adc-c0.25" in out and "pending" in out
    assert list(tmp_path.iterdir()) == []


def test_invalid_experiment_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["adc"]\nlr = [-1.0]\n')
    assert main([str(path), "--results-root", str(tmp_path / "r")]) == 2
    assert "'lr' = -1.0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """smoke.toml swept once, in process (2 points, 3 steps each)."""
    root = tmp_path_factory.mktemp("results")
    lines: list[str] = []
    exp = load_experiment("smoke")
    results = sweep.run_sweep(exp, results_root=root, progress=lines.append)
    assert [r.status for r in results] == ["completed", "completed"], lines
    return root / "smoke", "\n".join(lines)


def test_inprocess_sweep_writes_runs_and_table(smoke_sweep: tuple[Path, str]) -> None:
    out_dir, log = smoke_sweep
    assert "[1/2] none" in log and "[2/2] adc-c0.25" in log and "completed acc" in log
    for name in ("none", "adc-c0.25"):
        run = out_dir / name
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert (run / "config.json").exists() and (run / "checkpoint.pt").exists()
    assert json.loads((out_dir / "sweep.json").read_text())["points"] == ["none", "adc-c0.25"]


def test_rerun_skips_finished_points(
    smoke_sweep: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir, _ = smoke_sweep
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*/metrics.csv")}
    assert main(["smoke", "--results-root", str(out_dir.parent)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("skipped") >= 2 and "0 ran, 2 skipped, 0 failed" in out
    # the progress bar (stderr): the point running, the counts so far, points done of all
    assert "adc-c0.25 | done 0, failed 0, skipped 1" in captured.err and "2/2" in captured.err
    assert "| method \\ level | 0.25 | 1 |" in out  # the collected pivot
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*/metrics.csv")} == before


def test_rerun_over_a_damaged_finished_point_exits_1_naming_the_file(
    smoke_sweep: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished point is skipped on a rerun, so collect is the one to find its deleted
    metrics.csv: the sweep says so in one line naming the file and does not exit 0."""
    out_dir = tmp_path / "smoke"
    shutil.copytree(smoke_sweep[0], out_dir)
    (out_dir / "none" / "metrics.csv").unlink()
    assert main(["smoke", "--results-root", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out_dir / "none" / "metrics.csv") in errors[0]


def test_collect_table(smoke_sweep: tuple[Path, str]) -> None:
    out_dir, _ = smoke_sweep
    table = collect(out_dir)
    columns = ["run", "method", "compression", "level", *RESULT_COLUMNS, *ENERGY_RESULT_COLUMNS]
    assert list(table.columns) == columns
    one_client = table["energy_j"] == table["energy_max_client_j"]  # smoke runs one node
    assert one_client.all() and (table["energy_j"] > 0).all()
    assert list(table["run"]) == ["none", "adc-c0.25"]  # DESIGN order: none first
    on_disk = pd.read_csv(out_dir / TABLE_FILE)
    assert list(on_disk.columns) == list(table.columns) and len(on_disk) == 2
    none, adc = table.iloc[0], table.iloc[1]
    assert (none["level"], adc["level"]) == (1.0, 0.25)
    assert set(table["status"]) == {"completed"}
    assert set(table["stop_reason"]) == {"num-server-rounds"}
    assert list(table["steps"]) == [3, 3] and list(table["rounds"]) == [1, 1]
    assert none["compression_ratio"] == pytest.approx(1.0)
    assert 0.15 < adc["compression_ratio"] < 0.3
    summary = json.loads((out_dir / "adc-c0.25" / "summary.json").read_text())
    assert adc["test_accuracy"] == summary["test_accuracy"]
    assert adc["mb_up"] * 1e6 == pytest.approx(
        summary["bytes_up_act"] + summary["bytes_up_targets"]
    )
    assert adc["mb_total"] == pytest.approx(adc["mb_up"] + adc["mb_down"] + adc["mb_sync"])
    assert adc["mb_up"] < none["mb_up"] / 3  # ADC compresses, the sync does not
    assert markdown_pivot(table).splitlines()[2].startswith("| none |  | ")


def test_curves_are_eval_rows_against_mb(smoke_sweep: tuple[Path, str]) -> None:
    out_dir, _ = smoke_sweep
    frame = curves(out_dir)
    assert sorted(frame["run"]) == ["adc-c0.25", "none"]  # one evaluation per round
    assert list(frame["step"]) == [3, 3]
    table = collect(out_dir).set_index("run")
    for row in frame.itertuples():
        assert row.test_accuracy == table.loc[row.run, "test_accuracy"]
        assert row.mb_total == pytest.approx(table.loc[row.run, "mb_total"])


def test_failed_point_is_reported_and_the_sweep_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr 1e8 passes every check but the loss diverges at run time
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["none"]\nlr = [1e8, 1e-3]\n')
    assert main([str(path), "--results-root", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "[1/2] none-lr1e+08" in out and "failed" in out and "diverged" in out
    assert "[2/2] none-lr0.001" in out and "1 ran, 0 skipped, 1 failed" in out
    table = pd.read_csv(tmp_path / "r" / "exp" / TABLE_FILE).set_index("run")
    assert table.loc["none-lr0.001", "status"] == "completed"
    assert table.loc["none-lr1e+08", "status"] == "failed"
    assert "diverged" in table.loc["none-lr1e+08", "error"]
    assert "none-lr1e+08" not in set(curves(tmp_path / "r" / "exp")["run"])  # no result
    assert "none-lr1e+08" not in markdown_pivot(collect(tmp_path / "r" / "exp"))


def test_point_refused_before_it_ran_keeps_its_error_in_the_table(tmp_path: Path) -> None:
    """A point whose run directory holds another run never starts: its row says why."""
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["none", "adc"]\n')
    root = tmp_path / "r"
    other = RunConfig.from_run_config(
        {"dataset": "digits", "out-dir": str(root / "exp"), "run-name": "adc"}
    )
    RunDir(other.run_dir).write_config(other.to_run_config())
    RunDir(other.run_dir).append_metrics({"kind": "step", "round": 1, "step": 1})
    assert main([str(path), "--results-root", str(root)]) == 1
    table = pd.read_csv(root / "exp" / TABLE_FILE).set_index("run")
    assert table.loc["none", "status"] == "completed"
    assert table.loc["adc", "status"] == "failed"
    assert "holds a run with another config" in table.loc["adc", "error"]


def test_changed_config_of_a_finished_point_is_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BASE + '[[grid]]\nmethod = ["none"]\n')
    root = str(tmp_path / "r")
    assert main([str(path), "--results-root", root]) == 0
    path.write_text(path.read_text().replace("eval-samples = 32", "eval-samples = 48"))
    assert main([str(path), "--results-root", root]) == 1
    assert "holds a run with another config (eval-samples: 32 -> 48)" in capsys.readouterr().out


def test_flwr_runner_passes_the_whole_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line flwr_run.sh gets parses back to the point's config."""
    cfg = RunConfig.from_run_config(
        {"method": "adc", "lr": 1e-5, "snr-db": "-10,10", "out-dir": str(tmp_path), "run-name": "p"}
    )
    calls = []

    class FakePopen:
        """Stands in for the launcher: records the call, writes a summary, prints a line."""

        def __init__(self, argv: list[str], **kwargs: object) -> None:
            calls.append((argv, kwargs))
            (tmp_path / "p").mkdir()
            (tmp_path / "p" / "summary.json").write_text('{"status": "completed"}')
            self.stdout = io.StringIO("run p completed\n")
            self.returncode = 0

        def wait(self) -> int:
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", FakePopen)
    lines: list[str] = []
    assert sweep.run_point_flwr(cfg, 3, lines.append) == {"status": "completed"}
    ((argv, kwargs),) = calls
    assert argv[:3] == [sys.executable, "-m", "simulations.launcher"]
    assert argv[4].startswith("num-supernodes=3 ")
    parsed = parse_config_args([argv[3]])
    assert RunConfig.from_run_config(parsed | {"out-dir": str(tmp_path), "run-name": "p"}) == cfg
    env = kwargs["env"]
    assert env["OUT_DIR"] == str(tmp_path) and env["RUN_NAME"] == "p"
    assert lines == ["run p completed"]


def test_flwr_runner_failure_names_the_script_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig.from_run_config({"out-dir": str(tmp_path), "run-name": "p"})

    class FailingPopen:
        def __init__(self, argv: list[str], **kwargs: object) -> None:
            self.stdout = io.StringIO("starting\nrun p did not complete (summary status: failed)\n")
            self.returncode = 1

        def wait(self) -> int:
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", FailingPopen)
    with pytest.raises(RuntimeError, match=r"exited 1: starting \| run p did not complete"):
        sweep.run_point_flwr(cfg, 1, lambda _line: None)


def test_statistics_over_seeds_match_a_hand_computation() -> None:
    rows = [
        ("adc", 0.1, 1, "completed", 0.30, 100.0),
        ("adc", 0.1, 2, "completed", 0.40, 110.0),
        ("adc", 0.1, 3, "completed", 0.35, 90.0),
        ("adc", 0.25, 1, "completed", 0.50, 200.0),
        ("adc", 0.25, 2, "failed", 0.99, 1.0),  # not a result: left out
        ("none", 1.0, 1, "completed", 0.60, 800.0),
        ("none", 1.0, 2, "completed", 0.70, 820.0),
    ]
    table = pd.DataFrame(
        rows, columns=["method", "level", "seed", "status", "test_accuracy", "mb_total"]
    )
    table["compression"] = table["level"]
    stats = over_seeds(table, ["test_accuracy", "mb_total"]).set_index(["method", "level"])
    adc = stats.loc[("adc", 0.1)]
    assert adc["seeds"] == 3
    assert adc["test_accuracy_mean"] == pytest.approx(0.35)
    assert adc["test_accuracy_std"] == pytest.approx(math.sqrt((0.05**2 + 0.05**2 + 0) / 2))
    assert adc["mb_total_std"] == pytest.approx(10.0)
    assert stats.loc[("adc", 0.25), "seeds"] == 1
    assert math.isnan(stats.loc[("adc", 0.25), "test_accuracy_std"])
    text = markdown_pivot(table)
    assert "0.350 ± 0.050 (3)" in text and "0.650 ± 0.071 (2)" in text and "0.500 (1)" in text


def test_collect_writes_the_tidy_evaluation_table(smoke_sweep: tuple[Path, str]) -> None:
    out_dir, _ = smoke_sweep
    collect(out_dir)
    csv_frame = pd.read_csv(out_dir / "evals.csv")
    parquet_frame = pd.read_parquet(out_dir / "evals.parquet")
    assert len(csv_frame) == len(parquet_frame) == len(curves(out_dir)) > 0
    for column in ("seed", "method", "batch-size", "test_accuracy", "mb_total", "sim_time_s"):
        assert column in parquet_frame.columns
    assert list(parquet_frame["run"]) == list(csv_frame["run"])


def test_a_stop_between_two_results_stops_the_points_before_recording_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop signal that lands in the sweep's own loop (writing sweep.json, drawing the
    bar), not inside Ray's wait, still cancels the running points and shuts their Ray down
    before the sweep reads what they left."""
    events: list[str] = []

    def ray_results(
        queue: list[tuple[int, Any]], *_args: object, started: Any, **_kwargs: object
    ) -> Iterator[tuple[int, sweep.PointResult]]:
        try:
            for _, point in queue:
                started(point)
            index, point = queue[0]
            yield index, sweep.PointResult(point, "completed")
            yield index, sweep.PointResult(point, "completed")  # never reached
        finally:
            events.append("points stopped")

    def record_stopped(*_args: object) -> None:
        events.append("recorded")

    def signal_in_the_loop(line: str) -> None:
        if line.startswith("[1/"):  # the first point's line: a signal arrives here
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "ray_results", ray_results)
    monkeypatch.setattr(sweep, "_record_stopped", record_stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(
            load_experiment("smoke"), results_root=tmp_path, workers=2, progress=signal_in_the_loop
        )
    assert events == ["points stopped", "recorded"]
