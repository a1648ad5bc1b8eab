"""Named experiments: a TOML grid of run configs, swept point by point, then collected.

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
is derived from the values swept for it (``adc-c0.1``, ``c3sl-r4``); results go to
``<results-root>/<experiment>/<run-name>``.

    python -m simulations.sweep paper_sweep [--results-root results] [--runner inprocess|flwr]
        [--only method=adc] [--dry-run] [--nodes N] [--verbose] [--point-timeout SECONDS]

Finished points are skipped, so an interrupted sweep is resumed by running it again; a
failed point is reported (and recorded with its error in ``sweep.json``, which the table
shows) and the sweep goes on. Exit status: 0 all done, 1 some failed, 2 invalid, 130
interrupted.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import fnmatch
import itertools
import math
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.files import RunDirError, atomic_write_json
from adc_flwr.run.resume import FINISHED, RESUME, run_state
from adc_flwr.run.run_dir import RunDir
from simulations.collect import SWEEP_FILE, sweep_results
from simulations.preflight import format_pairs

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
ROOT = Path(__file__).resolve().parents[1]
FLWR_RUN_SCRIPT = ROOT / "scripts" / "flwr_run.sh"
RUNNERS = ("inprocess", "flwr")
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
POINT_LINE = "[{i:>{w}}/{n}] {name:<24} {status:<9} acc {acc}  {mb:>9} MB  {secs:>7.1f} s  {note}"


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


@dataclass
class PointResult:
    """What happened to one point of a sweep."""

    point: Point
    status: str  # completed, skipped, failed
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


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
            validate_run(point.config("results").to_run_config(), num_partitions=nodes)
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

    return [p for p in points if matches(p)]


def _equal(value: Any, text: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(value), float(text), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return False
    return str(value) == text


# ---- running --------------------------------------------------------------------------


def run_point_inprocess(
    cfg: RunConfig, nodes: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """One point through :class:`InProcessGrid` + ``run_training``: no Ray, deterministic."""
    from clients import client_app
    from simulations.inprocess_grid import InProcessGrid
    from strategies.lifecycle import run_training

    grid = InProcessGrid(client_app.app, nodes, cfg.to_run_config())
    return run_training(grid, cfg, progress=progress)


def run_point_flwr(
    cfg: RunConfig, nodes: int, progress: Callable[[str], None], timeout_s: float = 0.0
) -> dict[str, Any]:
    """One point through ``scripts/flwr_run.sh`` (``flwr run .`` on a private SuperLink).

    ``timeout_s`` > 0 limits the point: past it the script is sent SIGTERM (it ends every
    process of the run and writes an ``interrupted`` summary) and the point fails.
    """
    run_config = format_pairs(
        {k: v for k, v in cfg.to_run_config().items() if k not in RESERVED_KEYS}
    )
    env = os.environ | {
        "OUT_DIR": cfg.out_dir,
        "RUN_NAME": cfg.resolved_run_name,
        # the flwr CLI of this interpreter's environment comes first
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    argv = [
        "bash",
        str(FLWR_RUN_SCRIPT),
        run_config,
        f"num-supernodes={nodes} client-resources-num-cpus=1",
    ]
    tail: collections.deque[str] = collections.deque(maxlen=3)
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.terminate()  # the launcher ends the run's processes and says "interrupted"

    timer = threading.Timer(timeout_s, stop) if timeout_s > 0 else None
    if timer is not None:
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # streamed: a long point shows its rounds as they finish
            progress(line.rstrip("\n"))
            tail.append(line.strip())
        proc.wait()
    except BaseException:  # Ctrl-C in the sweep: stop the point's run, then stop
        proc.terminate()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out.is_set() and proc.returncode != 0:
        raise TimeoutError(f"point exceeded --point-timeout={timeout_s:g} s and was stopped")
    if proc.returncode != 0:
        raise RuntimeError(f"flwr_run.sh exited {proc.returncode}: " + " | ".join(tail))
    return RunDir(cfg.run_dir).read_summary() or {}


def run_sweep(
    experiment: Experiment,
    *,
    results_root: str | os.PathLike[str] = "results",
    runner: str = "inprocess",
    only: Sequence[str] = (),
    nodes: int | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    point_timeout: float = 0.0,
    progress: Callable[[str], None] = print,
    bar_file: IO[str] | None = None,
) -> list[PointResult]:
    """Run the selected points one after another; returns what happened to each.

    Finished points are skipped; a failed point is recorded and the next one runs.
    ``sweep.json`` records each point's status and error as the sweep goes, so a table
    shows why a point has no results. ``point_timeout`` (seconds, ``flwr`` runner) stops a
    point that runs longer. ``bar_file``: where to draw a progress bar (tqdm: the point
    running, points done / failed / skipped, an ETA); lines then go through the bar.
    """
    if runner not in RUNNERS:
        raise ExperimentError(f"runner {runner!r}: choose one of {RUNNERS}")
    nodes = nodes or experiment.nodes
    out_dir = experiment.out_dir(results_root, nodes)
    points = select(experiment.points, only)
    n = len(points)
    where = f"{out_dir} ({runner}, {nodes} node{'s' * (nodes > 1)})"
    progress(f"{experiment.name}: {n} of {len(experiment.points)} points -> {where}")
    if dry_run:
        for i, point in enumerate(points, 1):
            state = _state(point.config(out_dir))
            swept = " ".join(f"{k}={v}" for k, v in point.swept.items())
            progress(f"[{i:>{len(str(n))}}/{n}] {point.name:<24} {state:<9} {swept}")
    validate_points(experiment, points, nodes)  # after the listing: a dry run shows both
    if dry_run:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        recorded = sweep_results(out_dir)
    except RunDirError as exc:
        raise ExperimentError(str(exc)) from None
    record: dict[str, Any] = {
        "experiment": experiment.name,
        "file": str(experiment.path),
        "nodes": nodes,
        "runner": runner,
        "points": [p.name for p in experiment.points],
        "results": recorded,
    }
    atomic_write_json(out_dir / SWEEP_FILE, record)
    bar = tqdm(total=n, desc=experiment.name, unit="point", file=bar_file, disable=bar_file is None)
    if bar_file is not None:
        progress = bar.write
    inner = progress if verbose else (lambda _line: None)
    results: list[PointResult] = []
    counts = collections.Counter()
    with bar:
        for i, point in enumerate(points, 1):
            bar.set_postfix_str(
                f"{point.name} | done {counts['completed']}, failed {counts['failed']}, "
                f"skipped {counts['skipped']}"
            )
            result = _run_point(point, out_dir, runner, nodes, inner, point_timeout)
            results.append(result)
            counts[result.status] += 1
            if result.status != "skipped":
                record["results"][point.name] = {"status": result.status, "error": result.error}
                atomic_write_json(out_dir / SWEEP_FILE, record)
            progress(_point_line(i, n, result))
            bar.update()
    failed = [r for r in results if r.status == "failed"]
    done, skipped = counts["completed"], counts["skipped"]
    progress(f"{experiment.name}: {done} ran, {skipped} skipped, {len(failed)} failed")
    for r in failed:
        progress(f"  failed {r.point.name}: {r.error}")
    return results


def _state(cfg: RunConfig) -> str:
    """What a run of the point would do: ``done`` (skipped), ``partial`` (resumed),
    ``pending`` (started afresh) or ``conflict`` (refused: another run is there)."""
    try:
        state = run_state(RunDir(cfg.run_dir), cfg.to_run_config())
    except RunDirError:
        return "conflict"
    return {FINISHED: "done", RESUME: "partial"}.get(state, "pending")


def _run_point(
    point: Point,
    out_dir: Path,
    runner: str,
    nodes: int,
    inner: Callable[[str], None],
    point_timeout: float = 0.0,
) -> PointResult:
    cfg = point.config(out_dir)
    started = time.perf_counter()
    try:
        # the decision every run makes: another config there is refused, finished is skipped
        if run_state(RunDir(cfg.run_dir), cfg.to_run_config()) == FINISHED:
            return PointResult(point, "skipped", summary=RunDir(cfg.run_dir).read_summary() or {})
        if runner == "flwr":
            summary = run_point_flwr(cfg, nodes, inner, point_timeout)
        else:
            summary = run_point_inprocess(cfg, nodes, inner)
    except Exception as exc:  # a failed point must not end the sweep
        return PointResult(
            point,
            "failed",
            seconds=time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}",
        )
    seconds = time.perf_counter() - started
    if summary.get("status") != "completed":
        error = summary.get("error") or "no completed summary.json"
        return PointResult(point, "failed", seconds, summary, error)
    return PointResult(point, "completed", seconds, summary)


def _point_line(i: int, n: int, result: PointResult) -> str:
    s = result.summary
    acc = s.get("test_accuracy")
    total = sum(
        s.get(k) or 0
        for k in ("bytes_up_act", "bytes_up_targets", "bytes_down_grad", "bytes_model_sync")
    )
    note = result.error if result.status == "failed" else (s.get("stop_reason") or "")
    return POINT_LINE.format(
        i=i,
        w=len(str(n)),
        n=n,
        name=result.point.name,
        status=result.status,
        acc="  -   " if acc is None else f"{acc:.4f}",
        mb="-" if not total else f"{total / 1e6:.1f}",
        secs=result.seconds,
        note=note,
    )


# ---- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 all points done, 1 some failed, 2 the experiment is invalid."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.sweep",
        description="Sweep a named experiment (simulations/experiments/*.toml).",
    )
    parser.add_argument("experiment", help="experiment name or path to a TOML file")
    parser.add_argument("--results-root", default="results", help="default: results")
    parser.add_argument("--runner", choices=RUNNERS, default="inprocess")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE[,VALUE]",
        help="run only matching points (repeatable; name=GLOB matches run names)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the points, run nothing")
    parser.add_argument("--nodes", type=int, default=None, help="SuperNodes (default: file)")
    parser.add_argument("--verbose", action="store_true", help="show each run's own lines")
    parser.add_argument(
        "--point-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --runner flwr: stop a point running longer (0: no limit)",
    )
    args = parser.parse_args(argv)
    if args.nodes is not None and args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.point_timeout < 0 or (args.point_timeout and args.runner != "flwr"):
        parser.error("--point-timeout takes seconds >= 0 and needs --runner flwr")
    try:
        # the full checks run on the selected points only (in run_sweep)
        experiment = load_experiment(args.experiment, check_points=False)
        results = run_sweep(
            experiment,
            results_root=args.results_root,
            runner=args.runner,
            only=args.only,
            nodes=args.nodes,
            dry_run=args.dry_run,
            verbose=args.verbose,
            point_timeout=args.point_timeout,
            bar_file=None if args.dry_run else sys.stderr,
        )
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    from simulations.collect import TABLE_FILE, collect, markdown_pivot

    out_dir = experiment.out_dir(args.results_root, args.nodes)
    table = collect(out_dir)
    print(f"\n{len(table)} runs in {out_dir / TABLE_FILE}\n")
    print(markdown_pivot(table))
    return 1 if any(r.status == "failed" for r in results) else 0


__all__ = [
    "Experiment",
    "ExperimentError",
    "Point",
    "PointResult",
    "expand",
    "find_experiment",
    "load_experiment",
    "main",
    "point_name",
    "run_sweep",
    "select",
    "validate",
    "validate_points",
]

if __name__ == "__main__":
    sys.exit(main())
