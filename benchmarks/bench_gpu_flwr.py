"""``benchmarks/bench_gpu.py --flwr``: the benchmark's shapes through ``flwr run``.

One ``scripts/flwr_run.sh`` run per configuration (the project's launcher, ``flwr run`` on
Ray) with 4 clients sharing the GPU (``client-resources-num-gpus=0.25``) on scikit-learn's
digits resized to 224 px. Steps per second from ``metrics.csv``; GPU memory from
``nvidia-smi`` (per process, CUDA contexts included: ``max_memory_allocated`` exists only
inside a process). Needs the project's full environment (``pip install -e .``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLWR_CLIENTS = 4
FLWR_NEEDS = ("flwr", "ray", "flwr_datasets", "datasets", "sklearn")


def missing_for_flwr() -> list[str]:
    """The packages ``--flwr`` needs that this interpreter lacks."""
    return [name for name in FLWR_NEEDS if importlib.util.find_spec(name) is None]


def flwr_pairs(shapes: Any, method: str, xi: float, precision: str, steps: int) -> str:
    """The ``--run-config`` of one ``--flwr`` configuration (``shapes``: a ``Shapes``)."""
    return (
        f"dataset='digits' model='{shapes.model}' split-index={shapes.split_index} "
        f"batch-size={shapes.batch} lr={shapes.lr} method='{method}' compression={xi} "
        f"precision='{precision}' num-server-rounds=1 local-steps={steps} eval-samples=256 "
        "eval-batch-size=128 step-timeout=600.0"
    )


class GpuMemorySampler(threading.Thread):
    """Peak ``nvidia-smi`` used memory of all compute processes (MiB), sampled twice a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_total = self.peak_process = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"]
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            used = [float(x) for x in out.split() if x.strip().replace(".", "", 1).isdigit()]
            self.peak_total = max(self.peak_total, sum(used))
            self.peak_process = max(self.peak_process, max(used, default=0.0))


def through_flwr(
    shapes: Any,
    method: str,
    xi: float,
    precision: str,
    warmup: int,
    steps: int,
    out: Path,
    cpu: bool,
) -> dict[str, Any]:
    """One ``scripts/flwr_run.sh`` run: 4 clients on one GPU (a quarter each)."""
    name = f"gpu-{method}-{precision}"
    gpus = "" if cpu else " client-resources-num-gpus=0.25"
    federation = f"num-supernodes={FLWR_CLIENTS} client-resources-num-cpus=1{gpus}"
    run_config = flwr_pairs(shapes, method, xi, precision, warmup + steps)
    if cpu:
        run_config += " device='cpu'"
    env = os.environ | {"OUT_DIR": str(out), "RUN_NAME": name}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    sampler = GpuMemorySampler()
    if not cpu:
        sampler.start()
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", "scripts/flwr_run.sh", run_config, federation],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    sampler.done.set()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: flwr_run.sh exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    import pandas as pd

    metrics = pd.read_csv(out / name / "metrics.csv")
    wall = metrics.loc[metrics["kind"] == "step", "wall_time_s"].to_numpy()
    intervals = np.diff(wall)[warmup:]  # each: one exchange with every client
    median = float(np.median(intervals))
    return {
        "mode": "flwr",
        "method": method,
        "compression": xi if method != "none" else 1.0,
        "precision": precision,
        "model": shapes.model,
        "batch": shapes.batch,
        "split_index": shapes.split_index,
        "clients": FLWR_CLIENTS,
        "federation": federation,
        "timed_steps": len(intervals),
        "step_ms_median": median * 1e3,
        "steps_per_s": 1.0 / median,
        "client_steps_per_s": FLWR_CLIENTS / median,
        "peak_gpu_mb": None if cpu else sampler.peak_total,
        "peak_gpu_mb_one_process": None if cpu else sampler.peak_process,
        "whole_command_s": time.perf_counter() - started,
    }
