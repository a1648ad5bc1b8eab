"""Sweep an experiment's points, one after another or in parallel on Ray, then collect
their table.

    python -m simulations.sweep paper_sweep [--results-root results] [--runner inprocess|flwr]
        [--only method=adc] [--dry-run] [--nodes N] [--verbose] [--point-timeout SECONDS]
        [--workers N [--point-cpus C] [--point-gpus G]]

:mod:`simulations.experiments` reads the file and names the points; results go to
``<results-root>/<experiment>/<run-name>``. Finished points are skipped, so an interrupted
sweep is resumed by running it again; a failed point is reported (and recorded with its
error in ``sweep.json``, which the table shows) and the sweep goes on. The ``inprocess``
runner drives the real ServerApp loop on :class:`~simulations.inprocess_grid.InProcessGrid`
(no Ray, deterministic); the ``flwr`` runner runs ``python -m simulations.launcher`` per point
(``flwr run .`` under the one supervisor, as ``scripts/flwr_run.sh`` does). Ctrl-C, SIGTERM
and SIGHUP stop it alike: the running points end ``interrupted``, ``sweep.json`` and
``table.csv`` say so (:mod:`simulations.stopping`; [sweeps](../docs/sweeps.md)). Exit status: 0 all
done, 1 some failed, 2 invalid, 130 interrupted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from adc_flwr.config import RunConfig
from adc_flwr.run.files import RunDirError, atomic_write_json
from adc_flwr.run.resume import FINISHED, RESUME, run_state
from adc_flwr.run.run_dir import RunDir
from simulations.collect import (
    SWEEP_FILE,
    TABLE_FILE,
    TableError,
    collect,
    markdown_pivot,
    report_damaged,
    sweep_results,
)
from simulations.experiments import (
    RESERVED_KEYS,
    Experiment,
    ExperimentError,
    Point,
    load_experiment,
    select,
    validate_points,
)
from simulations.parallel import check_resources, ray_results
from simulations.preflight import format_pairs
from simulations.ray_address import RayAddressError, check_ray_address
from simulations.stopping import stop_signals, stopped_by

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("inprocess", "flwr")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
POINT_LINE = "[{i:>{w}}/{n}] {name:<24} {status:<9} acc {acc}  {mb:>9} MB  {secs:>7.1f} s  {note}"


@dataclass
class PointResult:
    """What happened to one point of a sweep."""

    point: Point
    status: str  # completed, skipped, or the run's own: failed, interrupted
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


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
    """One point through ``python -m simulations.launcher`` (``flwr run .`` on a private
    SuperLink, supervised as ``scripts/flwr_run.sh`` runs it).

    ``timeout_s`` > 0 limits the point: past it the launcher is sent SIGTERM (it ends every
    process of the run and writes an ``interrupted`` summary) and the point fails.
    """
    pairs = {k: v for k, v in cfg.to_run_config().items() if k not in RESERVED_KEYS}
    env = os.environ | {"OUT_DIR": cfg.out_dir, "RUN_NAME": cfg.resolved_run_name}
    argv = [
        sys.executable,
        "-m",
        "simulations.launcher",
        format_pairs(pairs),
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
            tail.append(plain(line).strip())
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
        raise RuntimeError(f"the launcher exited {proc.returncode}: " + " | ".join(tail))
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
    workers: int = 1,
    point_cpus: float | None = None,
    point_gpus: float = 0.0,
    progress: Callable[[str], None] = print,
    bar_file: IO[str] | None = None,
) -> list[PointResult]:
    """Run the selected points, one after another or (``workers`` > 1) as Ray tasks of
    ``point_cpus`` CPUs and ``point_gpus`` GPUs each (:mod:`simulations.parallel`); returns
    what happened to each, in the order they finished. ``point_cpus`` sets each point's
    torch threads (default: 1 with workers, torch's own count without).

    Finished points are skipped; a failed point is recorded and the next one runs.
    ``sweep.json`` records each point's status and error as the sweep goes, so a table
    shows why a point has no results. ``point_timeout`` (seconds, ``flwr`` runner) stops a
    point that runs longer. ``bar_file``: where to draw a progress bar (tqdm: the point
    running, points done / failed / skipped, an ETA); lines then go through the bar. Where
    Ray runs (``workers`` > 1, the ``flwr`` runner) ``RAY_ADDRESS`` is checked first
    (:mod:`simulations.ray_address`); a KeyboardInterrupt (:mod:`simulations.stopping`)
    records the points in flight before it goes on up.
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
    address = None
    if not dry_run and (workers > 1 or runner == "flwr"):  # Ray: the sweep's, or each point's
        try:
            address = check_ray_address()
        except RayAddressError as exc:
            raise ExperimentError(str(exc)) from None
        if workers > 1 and address is None:  # this machine, known before Ray starts
            check_resources([(os.cpu_count() or 1, point_gpus)], point_cpus or 1.0, point_gpus)
    validate_points(experiment, points, nodes)  # after the listing: a dry run shows both
    if dry_run:
        return []
    since = time.time_ns()
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
    inner = progress if verbose else _quiet
    results: list[PointResult] = []
    counts = collections.Counter()
    running: list[str] = []

    def show(point: Point) -> None:
        running.append(point.name)
        bar.set_postfix_str(
            f"{', '.join(running[-workers:])} | done {counts['completed']}, failed "
            f"{counts['failed']}, skipped {counts['skipped']}"
        )

    if workers > 1:
        finished = [(i, r) for i, p in enumerate(points, 1) if (r := _skip(p, out_dir))]
        for _, result in finished:
            show(result.point)
        done = {result.point.name for _, result in finished}

        def in_parallel() -> Iterator[tuple[int, PointResult]]:
            yield from finished
            yield from ray_results(
                [(i, p) for i, p in enumerate(points, 1) if p.name not in done],
                _run_point,
                lambda point: (point, out_dir.resolve(), runner, nodes, _quiet, point_timeout),
                workers=workers,
                point_cpus=point_cpus or 1.0,
                point_gpus=point_gpus,
                lost=lambda point, exc: PointResult(point, "failed", error=plain(str(exc))),
                started=show,
                address=address,
            )

        outcomes = in_parallel()
    else:

        def one_by_one() -> Iterator[tuple[int, PointResult]]:
            with torch_threads(point_cpus):
                for i, point in enumerate(points, 1):
                    show(point)
                    yield i, _run_point(point, out_dir, runner, nodes, inner, point_timeout)

        outcomes = one_by_one()
    with bar:
        try:
            for i, result in outcomes:
                running.remove(result.point.name)
                results.append(result)
                counted = result.status if result.status in ("completed", "skipped") else "failed"
                counts[counted] += 1
                if result.status != "skipped":
                    record["results"][result.point.name] = {
                        "status": result.status,
                        "error": result.error,
                    }
                    atomic_write_json(out_dir / SWEEP_FILE, record)
                progress(_point_line(i, n, result))
                bar.update()
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the points in flight
            # a signal between two results: stop the points (and Ray) before reading them
            outcomes.close()
            stopped = [p for p in points if p.name in running]
            _record_stopped(record, out_dir, stopped, since, exc, progress)
            raise
    failed = [r for r in results if r.status not in ("completed", "skipped")]
    done, skipped = counts["completed"], counts["skipped"]
    progress(f"{experiment.name}: {done} ran, {skipped} skipped, {len(failed)} failed")
    for r in failed:
        progress(f"  failed {r.point.name}: {r.error}")
    return results


def _record_stopped(
    record: dict[str, Any],
    out_dir: Path,
    points: Sequence[Point],
    since_ns: int,
    exc: KeyboardInterrupt,
    progress: Callable[[str], None],
) -> None:
    """The points a stop signal caught running, in ``sweep.json``: the status their run's
    summary gives (``interrupted``), or ``interrupted`` when the run wrote none."""
    why = f"the sweep was stopped ({stopped_by(exc)})"
    for point in points:
        summary = _fresh_summary(RunDir(point.config(out_dir).run_dir), since_ns)
        status = summary.get("status", "interrupted")
        record["results"][point.name] = {"status": status, "error": summary.get("error") or why}
        progress(f"{point.name}: {status} ({why})")
    atomic_write_json(out_dir / SWEEP_FILE, record)


@contextlib.contextmanager
def torch_threads(cpus: float | None) -> Iterator[None]:
    """torch's threads set to ``cpus`` (at least 1) for the block; None: left as they are."""
    if cpus is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet(_line: str) -> None:
    """A point's own lines, when they are not shown."""


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
    """Run one point; its status is the one its run's summary gives, whenever the attempt
    wrote one (``failed``, ``interrupted``), so the sweep's records and the run agree."""
    cfg = point.config(out_dir)
    run_dir = RunDir(cfg.run_dir)
    started, since = time.perf_counter(), time.time_ns()
    error = None
    try:
        # the decision every run makes: another config there is refused, finished is skipped
        if (skipped := _finished(point, out_dir)) is not None:
            return skipped
        if runner == "flwr":
            run_point_flwr(cfg, nodes, inner, point_timeout)
        else:
            run_point_inprocess(cfg, nodes, inner)
    except Exception as exc:  # a failed point must not end the sweep
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    summary = _fresh_summary(run_dir, since)
    status = summary.get("status", "failed")
    if status == "completed" and error is None:
        return PointResult(point, "completed", seconds, summary)
    said = summary.get("error")
    error = "; ".join(dict.fromkeys(e for e in (error, said) if e)) or "no completed summary.json"
    status = "failed" if status == "completed" else status
    return PointResult(point, status, seconds, summary, plain(error))


def _finished(point: Point, out_dir: Path) -> PointResult | None:
    """A ``skipped`` result when the point's run already finished (raises
    :class:`RunDirError` when another run holds its directory)."""
    run_dir = RunDir(point.config(out_dir).run_dir)
    if run_state(run_dir, point.config(out_dir).to_run_config()) == FINISHED:
        return PointResult(point, "skipped", summary=run_dir.read_summary() or {})
    return None


def _skip(point: Point, out_dir: Path) -> PointResult | None:
    """:func:`_finished`, or None where the directory holds another run (its task then
    fails the point as the sequential sweep does)."""
    try:
        return _finished(point, out_dir)
    except RunDirError:
        return None


def _fresh_summary(run_dir: RunDir, since_ns: int) -> dict[str, Any]:
    """The summary this attempt wrote ({} when it wrote none, or it cannot be read)."""
    try:
        if run_dir.summary_path.stat().st_mtime_ns < since_ns:
            return {}
        return run_dir.read_summary() or {}
    except (OSError, RunDirError):
        return {}


def plain(text: str) -> str:
    """``text`` without terminal colour codes (Flower colours its log lines): files get words."""
    return ANSI_CODE.sub("", text)


def _point_line(i: int, n: int, result: PointResult) -> str:
    s = result.summary
    acc = s.get("test_accuracy")
    total = sum(
        s.get(k) or 0
        for k in ("bytes_up_act", "bytes_up_targets", "bytes_down_grad", "bytes_model_sync")
    )
    note = result.error if result.error else (s.get("stop_reason") or "")
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


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="points at once, as Ray tasks (RAY_ADDRESS: on that cluster); 1: one by one",
    )
    parser.add_argument(
        "--point-cpus",
        type=float,
        default=None,
        help="CPUs per point, as torch threads (default: 1 with --workers, else torch's own)",
    )
    parser.add_argument("--point-gpus", type=float, default=0.0, help="GPUs per point (fraction)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 all points done, 1 some failed, 2 the experiment is invalid, 130
    stopped by Ctrl-C, SIGTERM or SIGHUP (the table is still written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if (args.point_cpus is not None and not args.point_cpus > 0) or not args.point_gpus >= 0:
        parser.error("--point-cpus must be > 0 and --point-gpus >= 0")
    if args.nodes is not None and args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.point_timeout < 0 or (args.point_timeout and args.runner != "flwr"):
        parser.error("--point-timeout takes seconds >= 0 and needs --runner flwr")
    experiment: Experiment | None = None
    with stop_signals():
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
                workers=args.workers,
                point_cpus=args.point_cpus,
                point_gpus=args.point_gpus,
                bar_file=None if args.dry_run else sys.stderr,
            )
            intact = args.dry_run or _print_table(experiment.out_dir(args.results_root, args.nodes))
        except ExperimentError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:  # stop signals are ignored from here on
            print(
                f"sweep interrupted ({stopped_by(exc)}); run the same command again to resume",
                file=sys.stderr,
            )
            if experiment is not None and not args.dry_run:
                _print_table(experiment.out_dir(args.results_root, args.nodes))
            return 130
    if args.dry_run:
        return 0
    return 1 if not intact or any(r.status not in ("completed", "skipped") for r in results) else 0


def _print_table(out_dir: Path) -> bool:
    """Collect ``out_dir`` into its ``table.csv`` and print the pivot (nothing when the
    sweep wrote nothing there yet); False when a point's files are damaged (one ``error:``
    line each, [sweeps](../docs/sweeps.md)) or the tables could not be written."""
    if not out_dir.is_dir():
        return True
    try:
        table = collect(out_dir)
    except FileNotFoundError:
        return True
    except (RunDirError, TableError) as exc:  # a damaged sweep.json, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return False
    print(f"\n{len(table)} runs in {out_dir / TABLE_FILE}\n")
    print(markdown_pivot(table))
    return not report_damaged(table)


if __name__ == "__main__":
    sys.exit(main())
