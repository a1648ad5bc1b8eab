"""Gather a sweep's run directories into tables that notebooks and BENCHMARKS.md read.

:func:`collect` reads every ``<results_dir>/<run>/config.json`` + ``summary.json`` and
writes, atomically, beside the runs:

- ``table.csv``: one row per run (status, why it stopped, final accuracy, MB, times);
- ``evals.csv`` / ``.parquet``: one row per completed run per evaluation, every config key
  beside accuracy, cumulative MB and wall and simulated time (:func:`curves`);
- ``clients.csv`` / ``.parquet``: one row per sampled client per round (:func:`client_rounds`);
- ``partitions.csv`` / ``.parquet``: train samples per class per partition
  (:func:`partition_counts`).

The tables are all a notebook needs, so results can ship without their run directories
(``simulations/results/``); collecting a folder with no runs leaves its tables alone.

    python -m simulations.collect results/paper_sweep [--values test_accuracy] [--long]

prints a markdown pivot (method × compression level -> accuracy) for BENCHMARKS.md; when a
sweep lists several seeds, each cell is the mean ± standard deviation over them (and their
number), and :func:`over_seeds` gives the same per point as a table.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from adc_flwr.config import RunConfig, nominal_level
from adc_flwr.results import (
    CLIENT_COLUMNS,
    CONFIG_FILE,
    PARTITIONS_FILE,
    RunDir,
    RunDirError,
    atomic_write_bytes,
    atomic_write_text,
)

TABLE_FILE = "table.csv"
# the tidy tables of a sweep, each as csv and parquet: one row per run per evaluation (every
# config key), per client per round (clients.csv) and per partition per class (partitions.csv)
EVALS, CLIENTS, PARTITIONS = "evals", "clients", "partitions"
SWEEP_FILE = "sweep.json"  # written by the sweep runner: its points and their statuses
# the order methods are listed in (DESIGN.md section 2); others follow alphabetically
METHOD_ORDER = ("none", "adc", "topk", "random-topk", "c3sl", "bottlenet", "quant", "pq")
# keys folded into `level`, so a pivot by level needs none of them as columns
LEVEL_KEYS = ("compression", "c3sl-r", "quant-bits", "batch-compression", "token-compression")
CONFIG_KEYS = tuple(k for k in RunConfig().to_run_config() if k not in ("out-dir", "run-name"))
RESULT_COLUMNS = (
    "status",
    "stop_reason",
    "test_accuracy",
    "test_loss",
    "mb_up",
    "mb_down",
    "mb_sync",
    "mb_total",
    "compression_ratio",
    "rounds",
    "steps",
    "wall_time_s",
    "sim_time_s",
    "error",
)
BYTES_PER_MB = 1e6  # as accounting.py: MB = 1e6 bytes


def _runs(results_dir: str | os.PathLike[str]) -> list[tuple[RunDir, dict[str, Any]]]:
    """The run directories under ``results_dir`` (those with a config.json) and configs."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir} is not a directory of runs")
    paths = sorted(p for p in results_dir.iterdir() if (p / CONFIG_FILE).is_file())
    return [(run, run.read_config() or {}) for run in map(RunDir, paths)]


def _swept_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose value is not the same in every run, in config order."""
    return [k for k in CONFIG_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _mb(values: Mapping[str, Any]) -> dict[str, Any]:
    """MB up (activations + targets), down (gradients), model sync, and their total.

    ``values`` holds byte counts: scalars (a summary; None when unknown) or columns.
    """

    def get(key: str) -> Any:
        value = values.get(key)
        return math.nan if value is None else value

    up = get("bytes_up_act") + get("bytes_up_targets")
    down, sync = get("bytes_down_grad"), get("bytes_model_sync")
    return {
        "mb_up": up / BYTES_PER_MB,
        "mb_down": down / BYTES_PER_MB,
        "mb_sync": sync / BYTES_PER_MB,
        "mb_total": (up + down + sync) / BYTES_PER_MB,
    }


def _method_rank(method: str) -> tuple[int, str]:
    """Methods in DESIGN order, unknown ones after them alphabetically."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def collect(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run of ``results_dir``; also written to ``<results_dir>/table.csv``.

    Columns: run, method, compression, level, the keys that vary between runs, then
    :data:`RESULT_COLUMNS`. A run without a summary has the status and error the sweep
    recorded for it (``sweep.json``), else ``incomplete`` (running, or killed); a point that
    failed before it made a run directory still has its row, with its error.
    """
    runs = _runs(results_dir)
    recorded = sweep_results(results_dir)
    if not runs and not recorded:
        # e.g. shipped tables without their run directories: leave them as they are
        raise FileNotFoundError(f"{results_dir} holds no run directories and no {SWEEP_FILE}")
    swept = [k for k in _swept_keys([c for _, c in runs]) if k not in ("method", "compression")]
    rows = []
    for run, config in runs:
        summary = run.read_summary() or recorded.get(run.path.name, {})
        metrics = run.read_metrics()
        rows.append(
            {
                "run": run.path.name,
                "method": config.get("method"),
                "compression": config.get("compression"),
                "level": nominal_level(config),
                **{k: config.get(k) for k in swept},
                "status": summary.get("status", "incomplete"),
                "stop_reason": summary.get("stop_reason"),
                "test_accuracy": summary.get("test_accuracy"),
                "test_loss": summary.get("test_loss"),
                **_mb(summary),
                "compression_ratio": summary.get("compression_ratio"),
                "rounds": summary.get("rounds"),
                "steps": int((metrics["kind"] == "step").sum()),
                "wall_time_s": summary.get("wall_time_s"),
                "sim_time_s": summary.get("sim_time_s"),
                "error": summary.get("error"),
            }
        )
    # points the sweep tried that left no run directory (refused before they started)
    seen = {run.path.name for run, _ in runs}
    for name, result in recorded.items():
        if name not in seen:
            rows.append({"run": name, "status": result.get("status"), "error": result.get("error")})
    columns = ["run", "method", "compression", "level", *swept, *RESULT_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        rank = table["method"].map(_method_rank)
        table = (
            table.assign(_rank=rank)
            .sort_values(["_rank", "level", "run"], kind="stable")
            .drop(columns="_rank")
            .reset_index(drop=True)
        )
    atomic_write_text(Path(results_dir) / TABLE_FILE, table.to_csv(index=False))
    write_tidy(results_dir, EVALS, curves(results_dir, all_keys=True))
    write_tidy(results_dir, CLIENTS, client_rounds(results_dir))
    write_tidy(results_dir, PARTITIONS, partition_counts(results_dir))
    return table


def write_tidy(results_dir: str | os.PathLike[str], name: str, frame: pd.DataFrame) -> None:
    """Write ``frame`` atomically as ``<name>.csv`` and ``<name>.parquet``."""
    folder = Path(results_dir)
    atomic_write_text(folder / f"{name}.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(folder / f"{name}.parquet", buffer.getvalue())


def _completed(results_dir: str | os.PathLike[str]) -> list[tuple[RunDir, dict[str, Any]]]:
    return [
        (run, config)
        for run, config in _runs(results_dir)
        if (run.read_summary() or {}).get("status") == "completed"
    ]


def _run_columns(run: RunDir, config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The columns that name a run in the per-run tables: run, method, level, ``keys``."""
    return {
        "run": run.path.name,
        "method": config.get("method"),
        "level": nominal_level(config),
        **{k: config.get(k) for k in keys},
    }


def _naming_keys(runs: Sequence[tuple[RunDir, Mapping[str, Any]]]) -> list[str]:
    """The keys that vary between runs, plus ``seed`` always (join on ``run`` for more)."""
    swept = [k for k in _swept_keys([c for _, c in runs]) if k != "method"]
    return swept if "seed" in swept else [*swept, "seed"]


def client_rounds(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``clients.csv`` (one row per sampled client per round), with
    the run's name, method, level, seed and the keys that vary between runs in front."""
    runs = _completed(results_dir)
    keys = _naming_keys(runs)
    frames = []
    for run, config in runs:
        rows = run.read_clients()
        if not rows.empty:
            frames.append(rows.assign(**_run_columns(run, config, keys)))
    if not frames:
        return pd.DataFrame(columns=["run", "method", "level", *keys, *CLIENT_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in CLIENT_COLUMNS]
    return frame[front + [c for c in frame.columns if c in CLIENT_COLUMNS]]


def partition_counts(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``partitions.csv`` in long form: run, method, level, seed, the
    keys that vary between runs, then partition_id, label, count (train samples)."""
    runs = _completed(results_dir)
    keys = _naming_keys(runs)
    frames = []
    for run, config in runs:
        path = run.path / PARTITIONS_FILE
        if not path.is_file():  # runs made before runs recorded their partitions
            continue
        wide = pd.read_csv(path, index_col="partition_id").drop(columns="total")
        long = wide.melt(ignore_index=False, var_name="label", value_name="count").reset_index()
        long["label"] = long["label"].astype(int)
        frames.append(long.assign(**_run_columns(run, config, keys)))
    if not frames:
        return pd.DataFrame(
            columns=["run", "method", "level", *keys, "partition_id", "label", "count"]
        )
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in ("partition_id", "label", "count")]
    return frame[[*front, "partition_id", "label", "count"]]


def sweep_results(results_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per-point status and error the sweep runner recorded in ``sweep.json``, if any."""
    path = Path(results_dir) / SWEEP_FILE
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("results", {}))
    except (json.JSONDecodeError, AttributeError) as exc:
        raise RunDirError(
            f"{path} is damaged ({exc}); move it away and run the sweep again"
        ) from exc


def curves(results_dir: str | os.PathLike[str], all_keys: bool = False) -> pd.DataFrame:
    """Every completed run's evaluation rows: accuracy against cumulative MB (and steps) for
    plots. Runs that failed or did not finish are left out: they are no result.

    Columns: run, method, level, the keys that vary between runs (with ``all_keys``: every
    config key), then round, step (global
    training steps done before the evaluation), test_accuracy, test_loss, mb_up, mb_down,
    mb_sync, mb_total, compression_ratio, wall_time_s, sim_time_s.
    """
    runs = _runs(results_dir)
    keys = CONFIG_KEYS if all_keys else _swept_keys([c for _, c in runs])
    swept = [k for k in keys if k != "method"]
    frames = []
    for run, config in _completed(results_dir):
        metrics = run.read_metrics()
        steps_done = (metrics["kind"] == "step").cumsum()
        evals = metrics[metrics["kind"] == "eval"]
        if evals.empty:
            continue
        frame = pd.DataFrame(
            {
                "run": run.path.name,
                "method": config.get("method"),
                "level": nominal_level(config),
                **{k: config.get(k) for k in swept},
                "round": evals["round"].to_numpy(),
                "step": steps_done[evals.index].to_numpy(),
                "test_accuracy": evals["test_accuracy"].to_numpy(),
                "test_loss": evals["test_loss"].to_numpy(),
            }
        )
        for key, values in _mb(evals).items():  # cumulative byte counts at each evaluation
            frame[key] = values.to_numpy()
        for key in ("compression_ratio", "wall_time_s", "sim_time_s"):
            frame[key] = evals[key].to_numpy()
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run", "method", "level", *swept, "round", "step"])
    return pd.concat(frames, ignore_index=True)


# ---- markdown -------------------------------------------------------------------------


def _point_keys(table: pd.DataFrame) -> list[str]:
    """The swept keys that tell points apart: all but the method, the level's own keys and
    the seed (seeds are repeats of one point)."""
    return [
        c
        for c in table.columns
        if c in CONFIG_KEYS and c not in ("method", "seed", *LEVEL_KEYS) and table[c].nunique() > 1
    ]


def pivot(
    table: pd.DataFrame, values: str = "test_accuracy", aggfunc: str = "mean"
) -> pd.DataFrame:
    """Completed runs, method (rows) × level or the other swept keys (columns) -> ``values``,
    aggregated over seeds with ``aggfunc`` (``mean``, ``std``: sample, NaN for one seed;
    ``count``).

    The columns are the swept keys besides the method, the seed and the level's own keys (an
    ablation's pooling, batch size, split index), plus the level when it varies; with none
    of those, the level.
    """
    done = table[table["status"] == "completed"]
    others = _point_keys(table)
    columns = others + (["level"] if not others or table["level"].nunique() > 1 else [])
    result = done.pivot_table(index="method", columns=columns, values=values, aggfunc=aggfunc)
    return result.loc[sorted(result.index, key=_method_rank)]


def over_seeds(
    table: pd.DataFrame, values: Sequence[str] = ("test_accuracy", "mb_total", "sim_time_s")
) -> pd.DataFrame:
    """One row per point (completed runs grouped by everything swept but the seed): the
    number of seeds and, per value, its mean and sample standard deviation (NaN for one)."""
    done = table[table["status"] == "completed"]
    keys = ["method", "level", *_point_keys(table)]
    grouped = done.groupby(keys, dropna=False, sort=False)
    stats = grouped[list(values)].agg(["mean", "std"])
    stats.columns = [f"{value}_{stat}" for value, stat in stats.columns]
    stats.insert(0, "seeds", grouped.size())
    return stats.reset_index()


def to_markdown(frame: pd.DataFrame, fmt: str = "{:.3f}") -> str:
    """A plain markdown table (pandas' own needs the optional ``tabulate`` package).

    Float cells use ``fmt`` (NaN is blank); index and column labels use ``:g``.
    """

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else fmt.format(value)
        return "" if value is None else str(value)

    def label(value: Any) -> str:
        if isinstance(value, tuple):  # several column keys
            return ", ".join(label(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    column_names = ", ".join(str(n) for n in frame.columns.names if n is not None)
    corner = str(frame.index.name or "") + (f" \\ {column_names}" if column_names else "")
    header = [corner, *(label(c) for c in frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([label(index), *(cell(v) for v in row)]) + " |")
    return "\n".join(lines)


def markdown_pivot(table: pd.DataFrame, values: str = "test_accuracy") -> str:
    """:func:`pivot` as markdown; MB and seconds with one decimal, the rest with three. With
    several seeds per point a cell reads ``mean ± std (seeds)``."""
    if table.empty or not (table["status"] == "completed").any():
        return "(no completed runs)"
    fmt = "{:.1f}" if values.startswith(("mb_", "wall_time", "sim_time")) else "{:.3f}"
    mean = pivot(table, values)
    if "seed" not in table.columns or table["seed"].nunique() < 2:
        return to_markdown(mean, fmt)
    std, count = (
        pivot(table, values, stat).reindex(index=mean.index, columns=mean.columns)
        for stat in ("std", "count")
    )
    cells = mean.copy().astype(object)
    for row in mean.index:
        for column in mean.columns:
            m, sd, n = mean.at[row, column], std.at[row, column], count.at[row, column]
            if not n or math.isnan(m):
                cells.at[row, column] = ""
            elif math.isnan(sd):
                cells.at[row, column] = f"{fmt.format(m)} (1)"
            else:
                cells.at[row, column] = f"{fmt.format(m)} ± {fmt.format(sd)} ({int(n)})"
    return to_markdown(cells, fmt)


LONG_COLUMNS = (
    "run",
    "level",
    "compression_ratio",
    "test_accuracy",
    "mb_total",
    "steps",
    "stop_reason",
    "wall_time_s",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.collect",
        description="Collect a sweep's runs into table.csv and print a markdown pivot.",
    )
    parser.add_argument("results_dir", help="a sweep's directory, e.g. results/paper_sweep")
    parser.add_argument("--values", default="test_accuracy", help="pivot cell column")
    parser.add_argument("--long", action="store_true", help="also print one row per run")
    args = parser.parse_args(argv)
    shipped = Path(args.results_dir) / TABLE_FILE
    try:
        table = collect(args.results_dir)
    except FileNotFoundError as exc:
        if not shipped.is_file():
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # tables without their runs (simulations/results/): show them, rewrite nothing
        print(f"{args.results_dir} holds no run directories: its {TABLE_FILE} as it is")
        table = pd.read_csv(shipped)
    if args.values not in table.columns:
        print(f"error: --values {args.values!r} is not a column of {TABLE_FILE}", file=sys.stderr)
        return 2
    print(f"{len(table)} runs -> {Path(args.results_dir) / TABLE_FILE}\n")
    print(markdown_pivot(table, args.values))
    if args.long and len(table):
        print()
        print(to_markdown(table.set_index("method")[list(LONG_COLUMNS)], "{:.4g}"))
    return 0


__all__ = [
    "collect",
    "curves",
    "markdown_pivot",
    "nominal_level",
    "over_seeds",
    "pivot",
    "to_markdown",
]

if __name__ == "__main__":
    sys.exit(main())
