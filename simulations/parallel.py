"""A sweep's points in parallel, as Ray tasks (``python -m simulations.sweep --workers N``).

Each point is one task with its own resources (``--point-cpus``, ``--point-gpus``): Ray
starts at most ``workers`` at once and only where those resources are free, so points do
not oversubscribe cores, and torch in each task uses as many threads as the task has CPUs.
A task runs exactly what the sequential sweep runs for a point (:func:`run_point`), so a
point's results do not depend on the number of workers, only on its threads.

Ray tasks rather than Ray Tune: a sweep is a fixed list of points with this project's own
resume, skip, conflict and failure rules and its own tables; Tune would bring its own trial
directories, checkpoints and result logging beside them, and nothing here needs a search
algorithm or a trial scheduler.

``RAY_ADDRESS`` in the environment sends the tasks to that cluster (``ray start --head`` on
one machine, ``ray start --address`` on the others; the sweep checks it first,
:mod:`simulations.ray_address`); without it a private local Ray starts for the sweep, in a
temp dir of its own, and stops with it, its temp dir removed. A point that asks for more than
any node of the cluster has is refused before any task starts. Ctrl-C, SIGTERM and SIGHUP
(which the sweep turns into :class:`KeyboardInterrupt`; Ray's own SIGTERM handler, which
``ray.init`` installs, is put back to the sweep's) cancel the tasks (each point's run writes
an ``interrupted`` summary and stops what it started), then stop Ray's workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from simulations.experiments import ExperimentError, Point
from simulations.stopping import caught, fired, held, released, stop_signals
from simulations.supervise import remove_stale_homes

CANCEL_GRACE_S = 60.0  # how long cancelled points get to write their summaries
TEMP_PREFIX = "adcs."  # a sweep's private Ray temp dir: <tmp>/adcs.<pid>.<random>


def run_point_task(run_point: Callable[..., Any], threads: int, *args: Any) -> Any:
    """A Ray worker's side: torch threads set to the task's CPUs, then the point.

    A ``--runner flwr`` point starts its own Flower and Ray: it must not join this cluster,
    whose CPUs the sweep's own tasks hold (its actors would wait for them forever). The
    worker holds stop signals (:func:`_init`); during the point SIGTERM and SIGHUP are let
    through, so its launcher can be stopped, and one sent to the sweep's whole process group
    (``timeout``, a job scheduler) stops the point as the sweep's cancel does (Ray's own
    handler would end the worker before its run wrote an ``interrupted`` summary).
    """
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.pop("RAY_ADDRESS", None)
    main = threading.current_thread() is threading.main_thread()  # where Ray runs tasks
    with stop_signals() if main else contextlib.nullcontext(), released():
        return run_point(*args)


def ray_results(
    points: Sequence[tuple[int, Point]],
    run_point: Callable[..., Any],
    point_args: Callable[[Point], tuple],
    *,
    workers: int,
    point_cpus: float,
    point_gpus: float,
    lost: Callable[[Point, Exception], Any],
    started: Callable[[Point], None] = lambda _: None,
    address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(index, run_point(*point_args(point)))`` for each point, as the tasks finish; at most
    ``workers`` tasks in flight, on the cluster at ``address`` (None: a private Ray, see the
    module docstring). ``started(point)`` is called as each task is submitted; a task Ray
    lost (its worker killed, out of memory) gives ``lost(point, error)`` instead, and the
    other points go on. :class:`ExperimentError` when no node has a point's resources."""
    import ray

    own_cluster = not ray.is_initialized()
    temp_dir = None
    queue = list(points)
    pending: dict[Any, tuple[int, Point]] = {}
    try:
        if own_cluster:
            if address is None:  # (run_sweep checked this machine's CPUs before Ray starts)
                remove_stale_homes(TEMP_PREFIX)  # those of sweeps killed with -9
                temp_dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}.")
            _init(ray, address, temp_dir)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        check_resources(
            [(n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in nodes], point_cpus, point_gpus
        )
        task = ray.remote(run_point_task).options(
            num_cpus=point_cpus, num_gpus=point_gpus, max_retries=0
        )
        threads = max(1, int(point_cpus))
        while queue or pending:
            while queue and len(pending) < workers:
                index, point = queue.pop(0)
                started(point)
                pending[task.remote(run_point, threads, *point_args(point))] = (index, point)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, point = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # not the point's own failure
                    result = lost(point, exc)
                yield index, result
    except BaseException:
        _cancel(ray, list(pending))
        raise
    finally:
        if own_cluster:
            ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _init(ray: Any, address: str | None, temp_dir: str | None) -> None:
    """``ray.init`` with this process's SIGTERM handler kept (Ray replaces it with one that
    calls ``sys.exit``, which aborted the sweep inside Ray) and stop signals held meanwhile:
    Ray's processes keep them held, so a signal sent to the sweep's process group cannot end
    the raylet under points still writing their summaries (Ray then stops them with
    SIGKILL at ``ray.shutdown``, a few seconds later); one that came during the call is
    handled by the sweep's handler, once it is back or in place of Ray's."""
    ours = signal.getsignal(signal.SIGTERM)
    # held: the main thread's mask (another thread, tqdm's, may still take a signal)
    with held(), caught() as came:
        try:
            ray.init(
                # "local": a private Ray, never a cluster an earlier `ray start` left here
                address=address or "local",
                include_dashboard=False,
                log_to_driver=False,  # a point's own lines stay in its run directory's records
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
                _temp_dir=temp_dir,
            )
        except SystemExit as exc:  # Ray's handler took a SIGTERM
            if exc.code != signal.SIGTERM or not callable(ours):
                raise
        finally:
            if not fired():  # else ours took a stop signal: later ones stay ignored
                signal.signal(signal.SIGTERM, ours)
    if signal.SIGTERM in came and callable(ours):  # the sweep's own stop, as if it took it
        ours(signal.SIGTERM, None)


def check_resources(sizes: Sequence[tuple[float, float]], cpus: float, gpus: float) -> None:
    """:class:`ExperimentError` unless one of the nodes (their CPUs and GPUs) has ``cpus``
    CPUs and ``gpus`` GPUs: Ray would queue the task forever."""
    if any(cpu >= cpus and gpu >= gpus for cpu, gpu in sizes):
        return
    largest = ", ".join(f"{cpu:g} CPUs and {gpu:g} GPUs" for cpu, gpu in sorted(set(sizes)))
    raise ExperimentError(
        f"--point-cpus {cpus:g} --point-gpus {gpus:g}: no node of the Ray cluster has that "
        f"much (its nodes: {largest or 'none alive'}); ask for at most what one node has"
    )


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Ask each task to stop (KeyboardInterrupt inside it: its run says ``interrupted``
    and ends what it started), wait for them, then force what is left."""
    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + CANCEL_GRACE_S
    left = refs
    while left and time.monotonic() < deadline:
        _, left = ray.wait(left, num_returns=len(left), timeout=1.0)
    for ref in left:
        ray.cancel(ref, force=True)


def _pythonpath() -> str:
    """This repository first on the workers' path (their working directory is Ray's)."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
