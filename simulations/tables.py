"""A sweep's run directories read into tidy tables (one row per run per evaluation, per
client per round, per partition per class), written atomically as csv and parquet.

:func:`simulations.collect.collect` writes them beside the runs; notebooks read them
(:mod:`simulations.studies`) without the run directories.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adc_flwr.config import RunConfig, nominal_level
from adc_flwr.privacy.columns import PRIVACY_COLUMNS
from adc_flwr.run.files import atomic_write_bytes, atomic_write_text
from adc_flwr.run.run_dir import CLIENT_COLUMNS, CONFIG_FILE, PARTITIONS_FILE, RunDir

# the tidy tables of a sweep, each as csv and parquet: one row per run per evaluation (every
# config key), per client per round (clients.csv) and per partition per class (partitions.csv)
EVALS, CLIENTS, PARTITIONS, PRIVACY = "evals", "clients", "partitions", "privacy"
CONFIG_KEYS = tuple(k for k in RunConfig().to_run_config() if k not in ("out-dir", "run-name"))
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


def write_tidy(results_dir: str | os.PathLike[str], name: str, frame: pd.DataFrame) -> None:
    """Write ``frame`` atomically as ``<name>.csv`` and ``<name>.parquet``."""
    folder = Path(results_dir)
    atomic_write_text(folder / f"{name}.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(folder / f"{name}.parquet", buffer.getvalue())


def _completed(
    runs: Sequence[tuple[RunDir, dict[str, Any]]],
) -> list[tuple[RunDir, dict[str, Any]]]:
    """The runs among ``runs`` (from :func:`_runs`) whose summary says completed."""
    return [
        (run, config)
        for run, config in runs
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
    runs = _completed(_runs(results_dir))
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


def privacy_rounds(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``privacy.csv`` (two rows per audited round: the scores against
    the merged target and the best member), with the run's name, method, level, seed and
    the keys that vary between runs in front; join ``table.csv`` on ``run`` for accuracy
    and bytes."""
    runs = _completed(_runs(results_dir))
    keys = _naming_keys(runs)
    frames = [
        rows.assign(**_run_columns(run, config, keys))
        for run, config in runs
        if not (rows := run.read_privacy()).empty
    ]
    if not frames:
        return pd.DataFrame(columns=["run", "method", "level", *keys, *PRIVACY_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    front = [c for c in frame.columns if c not in PRIVACY_COLUMNS]
    return frame[front + list(PRIVACY_COLUMNS)]


def privacy_images(results_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every completed run's ``privacy_images.npz``, keyed ``<run>/<name>`` (``merged``,
    ``best_member``, ``reconstruction``): the figure of originals against
    reconstructions, without the run directories."""
    return {
        f"{run.path.name}/{name}": array
        for run, _ in _completed(_runs(results_dir))
        for name, array in run.read_privacy_images().items()
    }


def partition_counts(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every completed run's ``partitions.csv`` in long form: run, method, level, seed, the
    keys that vary between runs, then partition_id, label, count (train samples)."""
    runs = _completed(_runs(results_dir))
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
    for run, config in _completed(runs):
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
