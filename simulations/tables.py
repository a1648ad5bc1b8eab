"""A sweep's run directories read into tidy tables (one row per run per evaluation, per
client per round, per partition per class), written atomically as csv and parquet.

:func:`simulations.collect.collect` writes them beside the runs; notebooks read them
(:mod:`simulations.studies`) without the run directories. Every table is built from one
reading of the runs (:func:`read_points`): a completed run with a file that cannot be read
is ``damaged`` and in none of them ([sweeps](../docs/sweeps.md#a-damaged-point)).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adc_flwr.config import RunConfig, nominal_level
from adc_flwr.privacy.columns import PRIVACY_COLUMNS
from adc_flwr.run.files import RunDirError, atomic_write_bytes, atomic_write_text
from adc_flwr.run.run_dir import (
    CLIENT_COLUMNS,
    CONFIG_FILE,
    PARTITIONS_FILE,
    PRIVACY_IMAGES_FILE,
    ROW_KINDS,
    TRAFFIC_COLUMNS,
    RunDir,
)

# the tidy tables of a sweep, each as csv and parquet: one row per run per evaluation (every
# config key), per client per round (clients.csv) and per partition per class (partitions.csv)
EVALS, CLIENTS, PARTITIONS, PRIVACY = "evals", "clients", "partitions", "privacy"
CONFIG_KEYS = tuple(k for k in RunConfig().to_run_config() if k not in ("out-dir", "run-name"))
BYTES_PER_MB = 1e6  # as accounting.py: MB = 1e6 bytes

# the columns each file must hold for the tables built from it
METRICS_NEEDED = ("kind", "round", "test_accuracy", "test_loss", *TRAFFIC_COLUMNS)
METRICS_NEEDED += ("wall_time_s", "sim_time_s")
CLIENTS_NEEDED = ("round", "partition", "outcome")
PRIVACY_NEEDED = ("round", "reference")
PARTITIONS_NEEDED = ("partition_id", "total")


class TableError(ValueError):
    """A table (or a run's file) that cannot be read or lacks a column it needs; the message
    is one line, ``<file>: <reason>``."""


def _reason(path: Path, exc: Exception) -> str:
    """``exc`` as one line after ``path``, without the file's content."""
    cause = exc.__cause__ or exc
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text (byte {cause.start}): binary or damaged"
    if isinstance(cause, json.JSONDecodeError):
        return f"not valid JSON ({cause.msg}, line {cause.lineno} column {cause.colno})"
    text = " ".join(str(exc).split())
    if text.startswith(str(path)):  # a RunDirError already names it
        return text[len(str(path)) :].lstrip(" :")
    return f"cannot be read ({type(exc).__name__}: {text})"


def read_table(path: Path, needed: Sequence[str] = (), torn_ok: bool = False) -> pd.DataFrame:
    """``path`` (``.parquet`` or csv) holding the ``needed`` columns, else a
    :class:`TableError` naming it. A csv must end with a newline unless ``torn_ok``: collect
    and a finished run write whole lines, so a cut last line is a truncated file."""
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            data = path.read_bytes()
            text = data.decode("utf-8")  # pandas' parser may trip on binary bytes first
            if not data or "\0" in text:
                raise TableError(f"{path}: {'empty' if not data else 'binary, not CSV text'}")
            if not torn_ok and not data.endswith(b"\n"):
                raise TableError(f"{path}: its last line is cut short (a truncated file)")
            frame = pd.read_csv(io.StringIO(text))
    except FileNotFoundError as exc:
        raise TableError(f"{path}: missing") from exc
    except TableError:
        raise
    except (OSError, ValueError) as exc:  # parse errors, pyarrow's ArrowInvalid among them
        raise TableError(f"{path}: {_reason(path, exc)}") from exc
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TableError(
            f"{path}: no column {missing[0]!r}{more}: truncated, or not written by this version"
        )
    return frame


@dataclass
class Point:
    """One run directory of a sweep, read once for every table (:func:`read_points`)."""

    run: RunDir
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    metrics: pd.DataFrame | None = None  # None: no metrics.csv (a run that never stepped)
    clients: pd.DataFrame | None = None  # these four: completed runs only
    privacy: pd.DataFrame | None = None
    partitions: pd.DataFrame | None = None  # as partitions.csv: a column per class
    images: dict[str, np.ndarray] = field(default_factory=dict)
    damage: str | None = None  # "<file>: <reason>": a file that could not be read

    @property
    def name(self) -> str:
        return self.run.path.name

    @property
    def completed(self) -> bool:
        """Completed and every file readable: a result, in every table."""
        return self.damage is None and (self.summary or {}).get("status") == "completed"


def read_points(
    results_dir: str | os.PathLike[str], recorded: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Point]:
    """The run directories under ``results_dir`` (those with a config.json), each read and
    checked once; ``recorded``: the statuses ``sweep.json`` holds, by run name."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir} is not a directory of runs")
    paths = sorted(p for p in results_dir.iterdir() if (p / CONFIG_FILE).is_file())
    return [_read_point(RunDir(p), (recorded or {}).get(p.name, {})) for p in paths]


def _read_point(run: RunDir, recorded: Mapping[str, Any]) -> Point:
    """A run's files; the first that cannot be read, or that a completed run lacks, is its
    ``damage`` (the run is then in no tidy table)."""
    point = Point(run)
    try:
        point.config = _checked(run.config_path, run.read_config) or {}
        point.summary = _checked(run.summary_path, run.read_summary)
        done = (point.summary or recorded).get("status") == "completed"
        if done and point.summary is None:
            raise TableError(f"{run.summary_path}: missing, though the sweep recorded it completed")
        if done or run.metrics_path.exists():
            point.metrics = read_table(run.metrics_path, METRICS_NEEDED, torn_ok=not done)
        if done:
            _read_results(point)
    except TableError as exc:
        point.damage = str(exc)
    return point


def _checked(path: Path, read: Callable[[], Any]) -> Any:
    """``read()`` (a :class:`RunDir` reader of ``path``), its RunDirError a TableError."""
    try:
        return read()
    except RunDirError as exc:
        raise TableError(f"{path}: {_reason(path, exc)}") from exc


def _read_results(point: Point) -> None:
    """A completed run's rows and tables, checked: metrics with an evaluation, clients.csv,
    and privacy.csv, partitions.csv, privacy_images.npz where the run wrote them."""
    run, metrics = point.run, point.metrics
    assert metrics is not None
    kinds = set(metrics["kind"].dropna()) - set(ROW_KINDS)
    if kinds:
        kind = sorted(map(str, kinds))[0][:20]
        raise TableError(f"{run.metrics_path}: a row of kind {kind!r}, not step or eval")
    if not (metrics["kind"] == "eval").any():
        raise TableError(f"{run.metrics_path}: no evaluation row, though the run completed")
    point.clients = read_table(run.clients.path, CLIENTS_NEEDED)
    if run.privacy.path.exists():
        point.privacy = read_table(run.privacy.path, PRIVACY_NEEDED)
    path = run.path / PARTITIONS_FILE
    if path.exists():  # runs made before runs recorded their partitions have none
        point.partitions = read_table(path, PARTITIONS_NEEDED)
        labels = [c for c in point.partitions.columns if c not in PARTITIONS_NEEDED]
        if not all(str(c).isdigit() for c in labels):
            raise TableError(f"{path}: a column that is no class id")
    path = run.path / PRIVACY_IMAGES_FILE
    point.images = _checked(path, run.read_privacy_images) or {}


def _swept_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose value is not the same in every run, in config order."""
    return [k for k in CONFIG_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _configs(points: Sequence[Point]) -> list[dict[str, Any]]:
    """The configs that could be read."""
    return [p.config for p in points if p.config]


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


def write_tidy(results_dir: str | os.PathLike[str], name: str, frame: pd.DataFrame) -> None:
    """Write ``frame`` atomically as ``<name>.csv`` and ``<name>.parquet``."""
    folder = Path(results_dir)
    atomic_write_text(folder / f"{name}.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(folder / f"{name}.parquet", buffer.getvalue())


def _run_columns(point: Point, keys: Sequence[str]) -> dict[str, Any]:
    """The columns that name a run in the per-run tables: run, method, level, ``keys``."""
    return {
        "run": point.name,
        "method": point.config.get("method"),
        "level": nominal_level(point.config),
        **{k: point.config.get(k) for k in keys},
    }


def _naming_keys(points: Sequence[Point]) -> list[str]:
    """The keys that vary between runs, plus ``seed`` always (join on ``run`` for more)."""
    swept = [k for k in _swept_keys(_configs(points)) if k != "method"]
    return swept if "seed" in swept else [*swept, "seed"]


def client_rounds(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``clients.csv`` (one row per sampled client per round), with
    the run's name, method, level, seed and the keys that vary between runs in front."""
    return client_table(read_points(results_dir))


def client_table(points: Sequence[Point]) -> pd.DataFrame:
    """:func:`client_rounds` of points already read."""
    done = [p for p in points if p.completed]
    keys = _naming_keys(done)
    frames = [
        p.clients.assign(**_run_columns(p, keys))
        for p in done
        if p.clients is not None and not p.clients.empty
    ]
    if not frames:
        return pd.DataFrame(columns=["run", "method", "level", *keys, *CLIENT_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in CLIENT_COLUMNS]
    return frame[front + [c for c in frame.columns if c in CLIENT_COLUMNS]]


def privacy_table(points: Sequence[Point]) -> pd.DataFrame:
    """Every completed run's ``privacy.csv`` (two rows per audited round: the scores against
    the merged target and the best member), with the run's name, method, level, seed and
    the keys that vary between runs in front; join ``table.csv`` on ``run`` for accuracy
    and bytes."""
    done = [p for p in points if p.completed]
    keys = _naming_keys(done)
    frames = [
        p.privacy.assign(**_run_columns(p, keys))
        for p in done
        if p.privacy is not None and not p.privacy.empty
    ]
    if not frames:
        return pd.DataFrame(columns=["run", "method", "level", *keys, *PRIVACY_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in PRIVACY_COLUMNS]
    return frame[front + list(PRIVACY_COLUMNS)]


def image_table(points: Sequence[Point]) -> dict[str, np.ndarray]:
    """Every completed run's ``privacy_images.npz``, keyed ``<run>/<name>`` (``merged``,
    ``best_member``, ``reconstruction``): the figure of originals against
    reconstructions, without the run directories."""
    return {
        f"{p.name}/{name}": array for p in points if p.completed for name, array in p.images.items()
    }


def partition_counts(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``partitions.csv`` in long form: run, method, level, seed, the
    keys that vary between runs, then partition_id, label, count (train samples)."""
    return partition_table(read_points(results_dir))


def partition_table(points: Sequence[Point]) -> pd.DataFrame:
    """:func:`partition_counts` of points already read."""
    done = [p for p in points if p.completed]
    keys = _naming_keys(done)
    frames = []
    for point in done:
        if point.partitions is None:  # runs made before runs recorded their partitions
            continue
        wide = point.partitions.set_index("partition_id").drop(columns="total")
        long = wide.melt(ignore_index=False, var_name="label", value_name="count").reset_index()
        long["label"] = long["label"].astype(int)
        frames.append(long.assign(**_run_columns(point, keys)))
    if not frames:
        return pd.DataFrame(
            columns=["run", "method", "level", *keys, "partition_id", "label", "count"]
        )
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in ("partition_id", "label", "count")]
    return frame[[*front, "partition_id", "label", "count"]]


EVAL_VALUES = (
    "test_accuracy",
    "test_loss",
    "mb_up",
    "mb_down",
    "mb_sync",
    "mb_total",
    "compression_ratio",
    "wall_time_s",
    "sim_time_s",
)


def curves(results_dir: str | os.PathLike[str], all_keys: bool = False) -> pd.DataFrame:
    """Every completed run's evaluation rows: accuracy against cumulative MB (and steps) for
    plots. Runs that failed, did not finish or are damaged are left out: they are no result.

    Columns: run, method, level, the keys that vary between runs (with ``all_keys``: every
    config key), then round, step (global training steps done before the evaluation),
    :data:`EVAL_VALUES` (MB cumulative).
    """
    return eval_table(read_points(results_dir), all_keys)


def eval_table(points: Sequence[Point], all_keys: bool = False) -> pd.DataFrame:
    """:func:`curves` of points already read."""
    keys = CONFIG_KEYS if all_keys else _swept_keys(_configs(points))
    swept = [k for k in keys if k != "method"]
    frames = []
    for point in points:
        if not point.completed or point.metrics is None:
            continue
        metrics = point.metrics
        steps_done = (metrics["kind"] == "step").cumsum()
        evals = metrics[metrics["kind"] == "eval"]
        frame = pd.DataFrame(
            {
                **_run_columns(point, swept),
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
        columns = ["run", "method", "level", *swept, "round", "step", *EVAL_VALUES]
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)
