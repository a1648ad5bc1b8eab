"""Experiment files: a TOML grid of run configs, expanded into named points.

An experiment file (``simulations/experiments/<name>.toml``) has:

- ``[base]``: run-config keys (kebab-case, those of pyproject's ``[tool.flwr.app.config]``)
  shared by every point;
- one or more ``[[grid]]`` tables whose values are lists: each table gives the cartesian
  product of its lists, and the tables are unioned (so "methods × compression levels" and
  "C3-SL R in {2, ..., 32}" live in one file). A key of the form ``"a,b"`` sweeps ``a`` and
  ``b`` together: its list holds ``[a, b]`` pairs (e.g. ADC's (xi_b, xi_t) at fixed xi);
- optionally ``[sweep]``: ``nodes`` (SuperNodes, default 1, as in the paper's single
  client) and ``description``.

Every selected point gets every check a run gets (:func:`adc_flwr.run.validation.validate_run`:
types and ranges, method, model and split index, data, partitioning over the nodes) before
anything runs, so a typo fails in seconds, not after an hour of sweeping. A point's run name
is derived from the values swept for it (``adc-c0.1``, ``c3sl-r4``). :mod:`simulations.sweep`
runs the points.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adc_flwr.config import ConfigError, RunConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
# set by the sweep for every point, never by the experiment file
RESERVED_KEYS = ("out-dir", "run-name")
RUN_CONFIG_KEYS = tuple(k for k in RunConfig().to_run_config() if k not in RESERVED_KEYS)
SWEEP_KEYS = ("nodes", "description")
# short forms of swept keys in run names ("" = the value alone); others use the full key
NAME_ABBREVIATIONS: dict[str, str] = {
    "compression": "c",
    "c3sl-r": "r",
    "quant-bits": "b",
    "batch-size": "bs",
    "split-index": "l",
    "batch-compression": "xb",
    "token-compression": "xt",
    "pooling": "pool-",
    "pq-subvectors": "q",
    "pq-centroids": "k",
    "bottlenet-width": "w",
    "seed": "s",
    "partitioner": "",
    "dataset": "",
    "channel": "",
    "wire-dtype": "",
    "sl-mode": "",
    "client-optimizer": "",
}


class ExperimentError(ValueError):
    """An experiment file is malformed or one of its points is not a valid run config."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
        name: the run name, derived from ``swept``.
        swept: the grid values that define this point, in the order the table lists them.
        run_config: ``[base]`` updated with ``swept`` (no ``out-dir`` / ``run-name``).
        table: index (0-based) of the ``[[grid]]`` table the point comes from.
    """

    name: str
    swept: dict[str, Any]
    run_config: dict[str, Any]
    table: int

    def config(self, out_dir: str | os.PathLike[str]) -> RunConfig:
        """The validated run config of this point with its results under ``out_dir``."""
        return RunConfig.from_run_config(
            self.run_config | {"out-dir": str(out_dir), "run-name": self.name}
        )


@dataclass
class Experiment:
    """A parsed, validated experiment file."""

    name: str
    path: Path
    base: dict[str, Any]
    points: list[Point]
    nodes: int = 1
    description: str = ""

    def out_dir(self, results_root: str | os.PathLike[str], nodes: int | None = None) -> Path:
        """``<results-root>/<experiment>``; another node count gets its own directory, since
        the number of SuperNodes is not a run-config key and would not tell runs apart."""
        suffix = "" if nodes in (None, self.nodes) else f"-nodes{nodes}"
        return Path(results_root).expanduser().resolve() / f"{self.name}{suffix}"


# ---- loading and expanding ------------------------------------------------------------


def find_experiment(name_or_path: str | os.PathLike[str]) -> Path:
    """A path to a TOML file, or the name of one in ``simulations/experiments``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path.resolve()
    named = EXPERIMENTS_DIR / f"{path.name.removesuffix('.toml')}.toml"
    if named.exists():
        return named
    known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")))
    raise ExperimentError(f"no experiment {str(name_or_path)!r}: not a file; named ones: {known}")


def load_experiment(
    name_or_path: str | os.PathLike[str], *, check_points: bool = True
) -> Experiment:
    """Parse, expand and validate an experiment file.

    Args:
        name_or_path: experiment name (``paper_sweep``) or path to a TOML file.
        check_points: also run every check a run gets on each point
            (:func:`validate_points`: loads the data, builds the model), which catches
            method- and model-specific errors (C3-SL's batch size, the split index) early.
    """
    path = find_experiment(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"base", "grid", "sweep"}
    if unknown:
        raise ExperimentError(
            f"{path}: unknown table(s) {sorted(unknown)}; allowed: [base], [[grid]], [sweep]"
        )
    sweep = data.get("sweep", {})
    _check_keys(path, "[sweep]", sweep, SWEEP_KEYS)
    nodes = sweep.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ExperimentError(f"{path}: [sweep] nodes = {nodes!r} must be an integer >= 1")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise ExperimentError(f"{path}: [base] must be a table")
    _check_keys(path, "[base]", base, RUN_CONFIG_KEYS)
    grids = data.get("grid", [])
    if not isinstance(grids, list) or not grids:
        raise ExperimentError(f"{path}: needs at least one [[grid]] table (lists of values)")
    points = expand(path, base, grids)
    experiment = Experiment(
        name=path.stem,
        path=path,
        base=base,
        points=points,
        nodes=nodes,
        description=str(sweep.get("description", "")),
    )
    validate(experiment)
    if check_points:
        validate_points(experiment, experiment.points, experiment.nodes)
    return experiment


def _check_keys(path: Path, where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in table:
        if key in RESERVED_KEYS:
            raise ExperimentError(
                f"{path}: {where}: {key!r} is set by the sweep "
                "(out-dir = <results-root>/<experiment>, run-name from the swept values)"
            )
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExperimentError(f"{path}: {where}: unknown key {key!r}{hint}")


def expand(path: Path, base: Mapping[str, Any], grids: Sequence[Any]) -> list[Point]:
    """The union over grid tables of the cartesian product of each table's lists.

    Duplicate points, and different points that would share a run name, are rejected.
    """
    points: list[Point] = []
    by_name: dict[str, Point] = {}
    for t, grid in enumerate(grids):
        where = f"[[grid]] table {t + 1}"
        if not isinstance(grid, dict) or not grid:
            raise ExperimentError(f"{path}: {where} is empty")
        axes: list[list[tuple[tuple[str, Any], ...]]] = []
        for spec, values in grid.items():
            keys = tuple(k.strip() for k in spec.split(","))
            _check_keys(path, where, dict.fromkeys(keys), RUN_CONFIG_KEYS)
            if not isinstance(values, list) or not values:
                raise ExperimentError(
                    f"{path}: {where}: {spec!r} must be a non-empty list of values "
                    f"(got {values!r}); constants belong in [base]"
                )
            axis = []
            for value in values:
                combo = (value,) if len(keys) == 1 else value
                if len(keys) > 1 and (not isinstance(value, list) or len(value) != len(keys)):
                    raise ExperimentError(
                        f"{path}: {where}: each value of {spec!r} must be a list of "
                        f"{len(keys)} values, got {value!r}"
                    )
                axis.append(tuple(zip(keys, combo, strict=True)))
            axes.append(axis)
        for combo in itertools.product(*axes):
            swept = dict(pair for part in combo for pair in part)
            point = Point(point_name(swept, base), swept, dict(base) | swept, t)
            other = by_name.get(point.name)
            if other is not None:
                same = _same_config(other.run_config, point.run_config)
                what = "duplicate point" if same else "two different points share the run name"
                raise ExperimentError(
                    f"{path}: {what} {point.name!r} (grid tables {other.table + 1} and {t + 1})"
                    + ("" if same else "; sweep the key that differs in both tables")
                )
            by_name[point.name] = point
            points.append(point)
    return points


def _same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two points resolve to the same run config (absent keys take defaults)."""
    try:
        return RunConfig.from_run_config(a) == RunConfig.from_run_config(b)
    except ConfigError:
        return dict(a) == dict(b)


def point_name(swept: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> str:
    """Deterministic run name from the swept values: the method, then ``<abbr><value>`` per
    other swept key in table order (``adc-c0.1``, ``c3sl-r4``, ``adc-xb0.5-xt0.2``)."""
    method = swept.get("method", (base or {}).get("method", RunConfig.method))
    parts = [_name_value(method)]
    for key, value in swept.items():
        if key != "method":
            parts.append(NAME_ABBREVIATIONS.get(key, key) + _name_value(value))
    return "-".join(parts)


def _name_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def validate(experiment: Experiment) -> None:
    """Raise :class:`ExperimentError` naming file, point and key for the first point whose
    values are of the wrong type or out of range."""
    for point in experiment.points:
        try:
            point.config("results")
        except ConfigError as exc:
            raise ExperimentError(f"{_where(experiment, point)}: {exc}") from None


def validate_points(experiment: Experiment, points: Iterable[Point], nodes: int) -> None:
    """Every check a run gets (:func:`adc_flwr.run.validation.validate_run`: method, model and
    split index, dataset, partitioning over ``nodes`` clients) for each point, before any
    runs, so a bad point fails the sweep in seconds with file, point and key."""
    from adc_flwr.run.validation import validate_run

    for point in points:
        try:
            validate_run(point.config("results").to_run_config(), num_supernodes=nodes)
        except ConfigError as exc:
            raise ExperimentError(f"{_where(experiment, point)}: {exc}") from None


def _where(experiment: Experiment, point: Point) -> str:
    i = experiment.points.index(point) + 1
    return (
        f"{experiment.path}: point {i}/{len(experiment.points)} {point.name!r} "
        f"(grid table {point.table + 1})"
    )


# ---- selecting ------------------------------------------------------------------------


def select(points: Iterable[Point], only: Sequence[str]) -> list[Point]:
    """Points matching every ``key=value[,value...]`` filter (``name=`` takes globs)."""
    filters = []
    for text in only:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not values:
            raise ExperimentError(f"--only {text!r}: expected key=value[,value...]")
        if key != "name" and key not in RUN_CONFIG_KEYS:
            raise ExperimentError(f"--only {text!r}: unknown key {key!r}")
        filters.append((key, [v.strip() for v in values.split(",")]))

    def matches(point: Point) -> bool:
        cfg = point.config("results").to_run_config()
        for key, wanted in filters:
            if key == "name":
                if not any(fnmatch.fnmatchcase(point.name, w) for w in wanted):
                    return False
            elif not any(_equal(cfg[key], w) for w in wanted):
                return False
        return True

    chosen = [p for p in points if matches(p)]
    if filters and not chosen:
        raise ExperimentError(_matches_nothing(list(points), filters))
    return chosen


def _matches_nothing(points: list[Point], filters: list[tuple[str, list[str]]]) -> str:
    """Why ``--only`` chose no point: the filters, and the values the points hold."""
    held = []
    for key in dict.fromkeys(key for key, _ in filters):
        if key == "name":
            values = [p.name for p in points]
        else:
            values = [str(p.config("results").to_run_config()[key]) for p in points]
        shown = list(dict.fromkeys(values))
        more = f", ... ({len(shown)} values)" if len(shown) > 8 else ""
        held.append(f"{key} {', '.join(shown[:8])}{more}")
    asked = " ".join(f"--only {key}={','.join(values)}" for key, values in filters)
    return f"{asked} matches none of the {len(points)} points (they hold {'; '.join(held)})"


def _equal(value: Any, text: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(value), float(text), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return False
    return str(value) == text
