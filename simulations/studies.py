"""What the study notebooks compute from a sweep's tables, kept out of the notebooks so it is
tested: labels, means over seeds, the cost of reaching an accuracy, where client time goes.

Everything here reads the tables :func:`simulations.collect.collect` writes (``table.csv``,
``evals``, ``clients``, ``partitions``); nothing trains or reads run directories, so the
notebooks run on the tables shipped under ``simulations/results/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adc_flwr.run.files import read_arrays
from adc_flwr.run.run_dir import PRIVACY_IMAGES_FILE
from adc_flwr.run.summary import STRAGGLER
from simulations.collect import (
    CLIENTS,
    EVALS,
    PARTITIONS,
    PRIVACY,
    TABLE_FILE,
    TABLE_NEEDED,
    over_seeds,
)
from simulations.tables import TableError, read_table

SHIPPED = Path(__file__).resolve().parent / "results"
FIGURES_ENV = "ADC_FIGURES"  # where notebooks save PNGs; default: beside the tables
# the columns the notebooks read from each table (besides the config keys they attach)
NEEDED = {
    TABLE_FILE: (*TABLE_NEEDED, "stop_reason", "test_accuracy", "mb_total"),
    EVALS: ("run", "method", "level", "round", "step", "test_accuracy", "mb_total"),
    CLIENTS: ("run", "method", "level", "round", "partition", "outcome"),
    PARTITIONS: ("run", "partition_id", "label", "count"),
    PRIVACY: ("run", "round", "reference"),
}


@dataclass
class Study:
    """A sweep's tables: ``table`` (one row per run) and the tidy ``evals``, ``clients``,
    ``partitions`` and ``privacy`` (empty when the sweep did not record them)."""

    folder: Path
    table: pd.DataFrame
    evals: pd.DataFrame
    clients: pd.DataFrame
    partitions: pd.DataFrame
    privacy: pd.DataFrame

    @property
    def completed(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "completed"]

    def attach(self, frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
        """``frame`` (with a ``run`` column) plus the config ``keys`` it lacks, taken from
        each run's evaluations (``evals`` has every config key): a key one sweep did not
        vary is not a column of its other tables."""
        missing = [k for k in keys if k not in frame.columns]
        if not missing:
            return frame
        if self.evals.empty or any(k not in self.evals.columns for k in missing):
            raise KeyError(f"{missing} are not config keys of {self.folder}'s runs")
        runs = self.evals.drop_duplicates("run")[["run", *missing]]
        return frame.merge(runs, on="run", how="left")

    def figure_path(self, name: str) -> Path:
        """``<ADC_FIGURES or the tables' folder>/<name>.png``."""
        folder = Path(os.environ.get(FIGURES_ENV) or self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}.png"


def load_study(folder: str | os.PathLike[str]) -> Study:
    """Read a sweep's tables (parquet where written, else csv), checked: each holds the
    columns the notebooks read, and the tidy tables hold only the runs ``table.csv`` calls
    completed (``evals`` all of them). A table that does not is a :class:`TableError`
    naming it ([sweeps](../docs/sweeps.md#a-damaged-point))."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / TABLE_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / TABLE_FILE} not found: run the sweep, then "
            f"`python -m simulations.collect {folder}`"
        )
    table = read_table(folder / TABLE_FILE, NEEDED[TABLE_FILE])
    completed = set(table.loc[table["status"] == "completed", "run"])

    def tidy(name: str) -> pd.DataFrame:
        path = next(
            (p for s in (".parquet", ".csv") if (p := folder / f"{name}{s}").is_file()), None
        )
        if path is None:
            return pd.DataFrame()
        frame = read_table(path, NEEDED[name])
        if extra := sorted(set(frame["run"]) - completed):
            raise TableError(f"{path}: holds run {extra[0]!r}, not completed in {TABLE_FILE}")
        if name == EVALS and (lacking := sorted(completed - set(frame["run"]))):
            raise TableError(
                f"{path}: no evaluation of run {lacking[0]!r}, completed in {TABLE_FILE}; "
                f"collect the sweep again (`python -m simulations.collect {folder}`)"
            )
        return frame

    return Study(folder, table, tidy(EVALS), tidy(CLIENTS), tidy(PARTITIONS), tidy(PRIVACY))


# ---- naming points --------------------------------------------------------------------


def point_label(row: pd.Series) -> str:
    """A method at its level as a reader says it: ``none``, ``adc 0.1``, ``quant 3 bit``,
    ``c3sl R=8``, ``adc adaptive`` (the swept knob, not the measured ratio)."""
    method = row["method"]
    if method == "none":
        return "none"
    if bool(row.get("adaptive-compression", False)):
        return f"{method} adaptive"
    if method == "quant" and row.get("quant-bits", 0) and not _missing(row.get("quant-bits")):
        return f"quant {int(row['quant-bits'])} bit"
    if method == "c3sl" and row.get("c3sl-r", 0) and not _missing(row.get("c3sl-r")):
        return f"c3sl R={int(row['c3sl-r'])}"
    return f"{method} {row['level']:g}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def with_points(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``point`` column (:func:`point_label`)."""
    if frame.empty:
        return frame.assign(point=pd.Series(dtype=str))
    return frame.assign(point=frame.apply(point_label, axis=1))


# ---- over seeds -----------------------------------------------------------------------


def seed_curves(evals: pd.DataFrame, x: str, by: Sequence[str] = ("point",)) -> pd.DataFrame:
    """Curves averaged over seeds: the k-th evaluation of every run of a point, grouped.

    Runs of one point evaluate on one schedule (every ``eval-every`` steps and at the end),
    so the k-th evaluations belong together even where the last one falls on a slightly
    different step (a budget). Columns: ``by``, k, seeds, ``x``_mean/_std,
    test_accuracy_mean/_std (std NaN for one seed).
    """
    frame = evals.sort_values(["run", "step"], kind="stable")
    frame = frame.assign(k=frame.groupby("run").cumcount())
    grouped = frame.groupby([*by, "k"], sort=False)
    out = grouped[[x, "test_accuracy"]].agg(["mean", "std"])
    out.columns = [f"{col}_{stat}" for col, stat in out.columns]
    out.insert(0, "seeds", grouped["run"].nunique())
    return out.reset_index()


def final_over_seeds(table: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per point (method, level, the other swept keys, ``by``): seeds and mean ± std of the
    final accuracy, MB, simulated time, achieved compression and steps, with its label."""
    stats = over_seeds(
        table,
        values=("test_accuracy", "mb_total", "sim_time_s", "compression_ratio", "steps"),
    )
    labels = with_points(table[table["status"] == "completed"])
    keys = [c for c in stats.columns if c in labels.columns and c not in ("seeds",)]
    names = labels.drop_duplicates(keys)[[*keys, "point"]]
    stats = stats.merge(names, on=keys, how="left")
    extra = [k for k in by if k in stats.columns]
    return stats[["point", *extra, *[c for c in stats.columns if c not in ("point", *extra)]]]


def reach_target(
    evals: pd.DataFrame,
    target: float,
    by: Sequence[str] = ("point",),
    costs: Sequence[str] = ("mb_total", "sim_time_s", "step"),
) -> pd.DataFrame:
    """What it took each point to first reach ``target`` test accuracy: per run the
    ``costs`` at its first evaluation at or above the target, then per point the mean and
    std over the seeds that reached it, and how many did (``reached`` of ``seeds``)."""
    frame = evals.sort_values(["run", "step"], kind="stable")
    first = frame[frame["test_accuracy"] >= target].groupby("run", sort=False).head(1)
    runs = frame.drop_duplicates("run")[[*by, "run"]]
    hit = runs.merge(first[["run", *costs]], on="run", how="left")
    grouped = hit.groupby(list(by), sort=False)
    out = grouped[list(costs)].agg(["mean", "std"])
    out.columns = [f"{col}_{stat}" for col, stat in out.columns]
    out.insert(0, "reached", grouped[costs[0]].count())
    out.insert(1, "seeds", grouped["run"].nunique())
    return out.reset_index()


def not_stopped_by(table: pd.DataFrame, reason: str) -> pd.DataFrame:
    """Runs that did not complete, or completed for another reason than ``reason`` (a
    budget-matched comparison wants every run stopped by ``budget-mb``)."""
    return table[(table["status"] != "completed") | (table["stop_reason"] != reason)]


def mean_std(mean: float, std: float, fmt: str = "{:.3f}") -> str:
    """``mean ± std`` (only the mean when std is NaN: one seed); blank for NaN means."""
    if _missing(mean):
        return ""
    return fmt.format(mean) if _missing(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"


# ---- the paper's claims -----------------------------------------------------------------


def nearest_level(level: float, grid: Sequence[float]) -> float:
    """The grid level nearest ``level`` on a log scale (quant's 1 bit, 1/32, and C3-SL's
    R = 32 share the 0.03 column; 8 bits and R = 4, 0.25, the 0.3 one)."""
    return min(grid, key=lambda g: abs(math.log(level) - math.log(g)))


def level_ranking(final: pd.DataFrame, grid: Sequence[float]) -> pd.DataFrame:
    """Final accuracy (mean over seeds) per grid level and compressing method, the best
    method of each level and ADC's gap to it: the paper's claim (d) in a table. ``final``:
    :func:`final_over_seeds` of one regime; ``none`` is left out (it has no level)."""
    squeezed = final[final["method"] != "none"]
    squeezed = squeezed.assign(xi=[nearest_level(v, grid) for v in squeezed["level"]])
    table = squeezed.pivot_table(
        index="xi", columns="method", values="test_accuracy_mean", aggfunc="mean"
    )
    table["best"] = table.idxmax(axis=1)
    if "adc" in table.columns:
        accuracies = table.drop(columns="best")
        table["adc_gap"] = accuracies.max(axis=1) - table["adc"]
        table["adc_rank"] = accuracies.rank(axis=1, ascending=False)["adc"]
    return table


# ---- clients --------------------------------------------------------------------------


def client_time(clients: pd.DataFrame, by: Sequence[str] = ("point", "profile")) -> pd.DataFrame:
    """Where a client's round goes: mean compute and transfer seconds (simulated) per
    client-round, over the client-rounds that trained (outcome ``finished``), with ξ and
    the count of client-rounds."""
    done = clients[clients["outcome"] == "finished"]
    grouped = done.groupby(list(by), sort=False)
    out = grouped[["xi", "compute_s", "transfer_s"]].mean()
    out.insert(0, "client_rounds", grouped.size())
    return out.reset_index()


def outcome_counts(clients: pd.DataFrame, by: Sequence[str] = ("point",)) -> pd.DataFrame:
    """Client-rounds per outcome (finished, dropped-out, straggler, ...) per group."""
    return clients.groupby([*by, "outcome"], sort=False).size().unstack("outcome", fill_value=0)


def links_of(trace: object) -> str:
    """A run's links as the ``edge_traces`` study names them: ``static`` or ``traced`` (from
    its ``profile-trace`` file's name), the file's stem for another trace, ``mix`` for none."""
    if _missing(trace) or not str(trace):
        return "mix"
    stem = Path(str(trace)).stem
    return next((kind for kind in ("traced", "static") if kind in stem), stem)


def links_runs(study: Study) -> pd.DataFrame:
    """One row per completed run: point, links, seed, accuracy, simulated time, straggler
    client-rounds, the clients' joules and the most-loaded client's (run-level figures)."""
    keys = [k for k in ("profile-trace", "seed") if k not in study.completed.columns]
    runs = with_points(study.attach(study.completed, keys) if keys else study.completed)
    trace = runs["profile-trace"] if "profile-trace" in runs else pd.Series("", index=runs.index)
    clients = study.clients
    cut = clients[clients["outcome"] == STRAGGLER].groupby("run").size()
    return runs.assign(
        links=trace.map(links_of), stragglers=runs["run"].map(cut).fillna(0).astype(int)
    )[
        [
            "run",
            "point",
            "links",
            "seed",
            "test_accuracy",
            "sim_time_s",
            "stragglers",
            "energy_j",
            "energy_max_client_j",
        ]
    ]


def federated_spread(clients: pd.DataFrame, by: Sequence[str] = ("point",)) -> pd.DataFrame:
    """Per-client accuracy on held-out shares at each point's last federated evaluation
    of every run: one row per client of that round (``fed_accuracy`` not null)."""
    rated = clients.dropna(subset=["fed_accuracy"])
    if rated.empty:
        return rated
    last = rated.groupby("run")["round"].transform("max")
    return rated[rated["round"] == last][[*by, "run", "partition", "fed_accuracy"]]


# ---- partitions -----------------------------------------------------------------------


def label_partitioner(partitions: pd.DataFrame, run: str, class_names: Sequence[str] = ()):
    """A flwr-datasets partitioner that holds ``run``'s recorded partitions (one row per
    train sample: partition and label), for ``flwr_datasets.visualization``'s plots.

    The table stores counts, not samples; a ``NaturalIdPartitioner`` over rows rebuilt from
    them has exactly those label counts per partition.
    """
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    rows = partitions[partitions["run"] == run].sort_values(["partition_id", "label"])
    if rows.empty:
        raise ValueError(f"no recorded partitions for run {run!r}")
    partition = np.repeat(rows["partition_id"].to_numpy(), rows["count"].to_numpy())
    label = np.repeat(rows["label"].to_numpy(), rows["count"].to_numpy())
    names = list(class_names) or [str(c) for c in range(int(rows["label"].max()) + 1)]
    features = datasets.Features(
        {"partition": datasets.Value("int64"), "label": datasets.ClassLabel(names=names)}
    )
    data = datasets.Dataset.from_dict({"partition": partition, "label": label}, features=features)
    partitioner = NaturalIdPartitioner(partition_by="partition")
    partitioner.dataset = data
    return partitioner


__all__ = [
    "SHIPPED",
    "Study",
    "TableError",
    "client_time",
    "federated_spread",
    "final_over_seeds",
    "label_partitioner",
    "load_study",
    "mean_std",
    "not_stopped_by",
    "outcome_counts",
    "point_label",
    "reach_target",
    "seed_curves",
    "with_points",
]


# ---- privacy ---------------------------------------------------------------------------

PRIVACY_SCORES = ("ssim", "psnr", "mse", "ssim_mean_image", "dcor", "dcor_unbiased")


def privacy_runs(study: Study) -> pd.DataFrame:
    """One row per completed run with an audit: its accuracy and MB (``table.csv``), its
    ``split-index``, and the last audit's scores against the merged target (``ssim``, ...)
    and the best member (``ssim_best_member``, ...)."""
    priv = study.privacy
    if priv.empty:
        return pd.DataFrame()
    last = priv[priv["round"] == priv.groupby("run")["round"].transform("max")]
    merged = last[last["reference"] == "merged"].set_index("run")[list(PRIVACY_SCORES)]
    best = last[last["reference"] == "best-member"].set_index("run")[list(PRIVACY_SCORES)]
    scores = merged.join(best.add_suffix("_best_member"))
    runs = study.attach(study.completed, ["split-index", "seed"])
    columns = ["run", "method", "level", "split-index", "seed", "test_accuracy", "mb_total"]
    return runs.merge(scores, left_on="run", right_index=True)[columns + list(scores.columns)]


def privacy_over_seeds(runs: pd.DataFrame) -> pd.DataFrame:
    """Per point (method, level, split) the mean and std over seeds of accuracy, MB and the
    scores of :func:`privacy_runs`, and the number of seeds (``seeds``)."""
    values = [c for c in runs.columns if c not in ("run", "method", "level", "split-index", "seed")]
    by = ["method", "level", "split-index"]
    grouped = runs.groupby(by, sort=False)[values]
    out = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std"))
    out["seeds"] = grouped.size()
    return out.reset_index()


def privacy_images(study: Study) -> dict[str, np.ndarray]:
    """The shipped example images (``privacy_images.npz``), keyed ``<run>/<name>``."""
    return read_arrays(study.folder / PRIVACY_IMAGES_FILE)
