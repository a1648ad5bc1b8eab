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
one machine, ``ray start --address`` on the others); without it a private local Ray starts
for the sweep and stops with it. Ctrl-C cancels the tasks (each point's run writes an
``interrupted`` summary and stops what it started), then stops Ray's workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from simulations.experiments import Point

CANCEL_GRACE_S = 60.0  # how long cancelled points get to write their summaries


def run_point_task(run_point: Callable[..., Any], threads: int, *args: Any) -> Any:
    """A Ray worker's side: torch threads set to the task's CPUs, then the point.

    A ``--runner flwr`` point starts its own Flower and Ray: it must not join this cluster,
    whose CPUs the sweep's own tasks hold (its actors would wait for them forever).
    """
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.pop("RAY_ADDRESS", None)
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
) -> Iterator[tuple[int, Any]]:
    """``(index, run_point(*point_args(point)))`` for each point, as the tasks finish; at most
    ``workers`` tasks in flight. ``started(point)`` is called as each task is submitted; a
    task Ray lost (its worker killed, out of memory) gives ``lost(point, error)`` instead,
    and the other points go on."""
    import ray

    # "local": a private Ray, never a cluster an earlier `ray start` left on this machine
    address = os.environ.get("RAY_ADDRESS") or "local"
    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,  # a point's own lines stay in its run directory's records
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
        )
    task = ray.remote(run_point_task).options(
        num_cpus=point_cpus, num_gpus=point_gpus, max_retries=0
    )
    threads = max(1, int(point_cpus))
    queue = list(points)
    pending: dict[Any, tuple[int, Point]] = {}
    try:
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
