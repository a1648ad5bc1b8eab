"""Gather a sweep's run directories into tables that notebooks and study READMEs read.

:func:`collect` reads every ``<results_dir>/<run>/config.json`` + ``summary.json`` and
writes, atomically, beside the runs:

- ``table.csv``: one row per run (status, why it stopped, final accuracy, MB, times);
- the tidy tables of :mod:`simulations.tables`: ``evals``, one row per completed run per
  evaluation with every config key; ``clients``, one row per sampled client per round;
  ``partitions``, train samples per class per partition; ``privacy``, one row per audited
  round per reference (``privacy-eval``) (each as csv and parquet), and
  ``privacy_images.npz``, each run's example reconstructions keyed ``<run>/<name>``.

The tables are all a notebook needs, so results can ship without their run directories
(``simulations/results/``); collecting a folder with no runs leaves its tables alone. A run
with a file that cannot be read is ``damaged`` in ``table.csv`` and in no other table; the
CLI names the file and exits 1 ([sweeps](../docs/sweeps.md#a-damaged-point)).

    python -m simulations.collect results/paper_sweep [--values test_accuracy] [--long]

prints a markdown pivot (method × compression level -> accuracy) for a study README; when a
sweep lists several seeds, each cell is the mean ± standard deviation over them (and their
number), and :func:`over_seeds` gives the same per point as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from adc_flwr.run.files import RunDirError, atomic_write_text, write_arrays
from adc_flwr.run.run_dir import PRIVACY_IMAGES_FILE
from simulations.tables import (
    CLIENTS,
    CONFIG_KEYS,
    EVALS,
    PARTITIONS,
    PRIVACY,
    Point,
    TableError,
    _configs,
    _mb,
    _reason,
    _swept_keys,
    client_table,
    curves,
    eval_table,
    image_table,
    nominal_level,
    partition_table,
    privacy_table,
    read_points,
    read_table,
    write_tidy,
)

TABLE_FILE = "table.csv"
DAMAGED = "damaged"  # the status of a run with a file collect cannot read
SWEEP_FILE = "sweep.json"  # written by the sweep runner: its points and their statuses
# the order methods are listed in (docs/design.md section 2); others follow alphabetically
METHOD_ORDER = ("none", "adc", "topk", "random-topk", "c3sl", "bottlenet", "quant", "pq")
# keys folded into `level`, so a pivot by level needs none of them as columns
LEVEL_KEYS = ("compression", "c3sl-r", "quant-bits", "batch-compression", "token-compression")
# what a table.csv must hold for the pivot (and the notebooks: simulations/studies.py)
TABLE_NEEDED = ("run", "method", "level", "status")
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
# the last privacy audit's scores (summary.json), added to table.csv when a run has them
PRIVACY_RESULT_COLUMNS = (
    "privacy_ssim",
    "privacy_psnr",
    "privacy_mse",
    "privacy_ssim_mean_image",
    "privacy_ssim_best_member",
    "privacy_dcor",
    "privacy_dcor_unbiased",
)


# the clients' joules (summary.json), added to table.csv when a run has them
ENERGY_RESULT_COLUMNS = (
    "energy_j",
    "energy_compute_j",
    "energy_radio_j",
    "energy_max_client_j",
)


def _method_rank(method: str | None) -> tuple[int, str]:
    """Methods in DESIGN order, unknown ones after them alphabetically (none: a run whose
    config could not be read, or a point that made no run directory)."""
    if not isinstance(method, str):
        return (len(METHOD_ORDER) + 1, "")
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def collect(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run of ``results_dir``; also written to ``<results_dir>/table.csv``.

    Columns: run, method, compression, level, the keys that vary between runs, then
    :data:`RESULT_COLUMNS`. A run without a summary has the status and error the sweep
    recorded for it (``sweep.json``), else ``incomplete`` (running, or killed); a point that
    failed before it made a run directory still has its row, with its error; a run with a
    file that cannot be read is ``damaged``, its error naming the file. The tidy tables hold
    the runs ``completed`` here, no others.
    """
    recorded = sweep_results(results_dir)
    points = read_points(results_dir, recorded)
    if not points and not recorded:
        # e.g. shipped tables without their run directories: leave them as they are
        raise FileNotFoundError(f"{results_dir} holds no run directories and no {SWEEP_FILE}")
    swept = [k for k in _swept_keys(_configs(points)) if k not in ("method", "compression")]
    rows = [_row(point, recorded.get(point.name, {}), swept) for point in points]
    # points the sweep tried that left no run directory (refused before they started)
    seen = {point.name for point in points}
    for name, result in recorded.items():
        if name not in seen:
            rows.append({"run": name, "status": result.get("status"), "error": result.get("error")})
    columns = ["run", "method", "compression", "level", *swept, *RESULT_COLUMNS]
    if any("privacy_ssim" in row for row in rows):
        columns += PRIVACY_RESULT_COLUMNS
    if any("energy_j" in row for row in rows):
        columns += ENERGY_RESULT_COLUMNS
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
    write_tidy(results_dir, EVALS, eval_table(points, all_keys=True))
    write_tidy(results_dir, CLIENTS, client_table(points))
    write_tidy(results_dir, PARTITIONS, partition_table(points))
    write_tidy(results_dir, PRIVACY, privacy_table(points))
    if images := image_table(points):
        write_arrays(Path(results_dir) / PRIVACY_IMAGES_FILE, images)
    return table


def _row(point: Point, recorded: dict[str, Any], swept: list[str]) -> dict[str, Any]:
    """``point``'s row of ``table.csv``; a damaged one's error names the file, then what the
    run itself said."""
    config, metrics = point.config, point.metrics
    steps = None if point.damage else 0  # no metrics.csv: a run that never stepped
    summary = point.summary or recorded
    status, error = summary.get("status", "incomplete"), summary.get("error")
    if point.damage:
        said = f" (the run's own status: {status}{f': {error}' if error else ''})"
        status, error = DAMAGED, point.damage + (said if summary else "")
    return {
        "run": point.name,
        "method": config.get("method"),
        "compression": config.get("compression"),
        "level": nominal_level(config) if config else None,
        **{k: config.get(k) for k in swept},
        "status": status,
        "stop_reason": summary.get("stop_reason"),
        "test_accuracy": summary.get("test_accuracy"),
        "test_loss": summary.get("test_loss"),
        **_mb(summary),
        "compression_ratio": summary.get("compression_ratio"),
        "rounds": summary.get("rounds"),
        "steps": int((metrics["kind"] == "step").sum()) if metrics is not None else steps,
        "wall_time_s": summary.get("wall_time_s"),
        "sim_time_s": summary.get("sim_time_s"),
        "error": error,
        **{k: summary[k] for k in PRIVACY_RESULT_COLUMNS if k in summary},
        **{k: summary[k] for k in ENERGY_RESULT_COLUMNS if k in summary},
    }


def sweep_results(results_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per-point status and error the sweep runner recorded in ``sweep.json``, if any."""
    path = Path(results_dir) / SWEEP_FILE
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("results", {}))
    except (ValueError, AttributeError, TypeError) as exc:  # not UTF-8, not JSON, no mapping
        raise RunDirError(
            f"{path}: damaged ({_reason(path, exc)}); move it away and run the sweep again"
        ) from exc


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


def report_damaged(table: pd.DataFrame, file: TextIO | None = None) -> int:
    """One ``error:`` line per damaged run of ``table`` (on stderr), naming its file; how many."""
    damaged = table[table["status"] == DAMAGED]
    for run, error in zip(damaged["run"], damaged["error"], strict=True):
        print(
            f"error: {error}; {run} is {DAMAGED} in {TABLE_FILE} and in no other table or "
            "pivot (restore the file, or move the run directory away and rerun its point)",
            file=file or sys.stderr,
        )
    return len(damaged)


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
        try:
            table = collect(args.results_dir)
        except FileNotFoundError as exc:
            if not shipped.is_file():
                raise TableError(str(exc)) from exc
            # tables without their runs (simulations/results/): show them, rewrite nothing
            print(f"{args.results_dir} holds no run directories: its {TABLE_FILE} as it is\n")
            table = read_table(shipped, TABLE_NEEDED)
        else:
            print(f"{len(table)} runs -> {shipped}\n")
    except (RunDirError, TableError) as exc:  # a damaged sweep.json or table, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.values not in table.columns:
        print(f"error: --values {args.values!r} is not a column of {TABLE_FILE}", file=sys.stderr)
        return 2
    print(markdown_pivot(table, args.values))
    if args.long and len(table):
        print()
        print(to_markdown(table.set_index("method")[list(LONG_COLUMNS)], "{:.4g}"))
    damaged = report_damaged(table)
    return 1 if damaged else 0


__all__ = [
    "CLIENTS",
    "DAMAGED",
    "EVALS",
    "PARTITIONS",
    "TableError",
    "collect",
    "curves",
    "markdown_pivot",
    "nominal_level",
    "over_seeds",
    "pivot",
    "report_damaged",
    "to_markdown",
]

if __name__ == "__main__":
    sys.exit(main())
