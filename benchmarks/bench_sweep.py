"""What `--workers` buys a sweep: the same 6-point sweep one point at a time and as Ray tasks.

The points: Fashion-MNIST, the vit-cpu preset, 4 in-process clients, 2 rounds of 150 steps,
methods none, ADC and Top-K at two seeds (about half a minute each on one core). Each sweep runs in
a fresh results root through the sweep's own command line, every point with one torch thread
(``--point-cpus 1``), so the tables of the runs can be compared: they must be identical
(wall time aside), and the script says so. With ``--cluster`` it also starts a local Ray
cluster (``ray start --head``), runs the parallel sweep on it through ``RAY_ADDRESS`` and
stops it.

    python benchmarks/bench_sweep.py [--workers 2] [--cluster] [--out DIR]

Prints one line per sweep (wall seconds) and the ratio parallel / one-by-one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
EXPERIMENT = """
[sweep]
description = "six points for bench_sweep"
nodes = 4

[base]
dataset = "fashion-mnist"
model = "vit-cpu"
batch-size = 32
num-server-rounds = 2
local-steps = 150
eval-samples = 500

[[grid]]
method = ["none", "adc", "topk"]
seed = [1, 2]
"""


def run_sweep(experiment: Path, root: Path, env: dict[str, str], *args: str) -> float:
    """Wall seconds of one sweep; raises when it did not complete every point."""
    argv = [sys.executable, "-m", "simulations.sweep", str(experiment)]
    argv += ["--results-root", str(root), "--point-cpus", "1", *args]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {args} exited {proc.returncode}:\n{proc.stdout[-2000:]}")
    return wall


def tables(root: Path) -> dict[str, pd.DataFrame]:
    found = {}
    for metrics in sorted(root.rglob("metrics.csv")):
        found[metrics.parent.name] = pd.read_csv(metrics).drop(columns=["wall_time_s"])
        found[metrics.parent.name + "/clients"] = pd.read_csv(metrics.parent / "clients.csv")
    return found


def same_tables(a: Path, b: Path) -> bool:
    ta, tb = tables(a), tables(b)
    if ta.keys() != tb.keys() or not ta:
        return False
    return all(ta[k].equals(tb[k]) for k in ta)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cluster", action="store_true", help="also on `ray start --head`")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    experiment = out / "six.toml"
    experiment.write_text(EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    one = run_sweep(experiment, out / "one", env, "--workers", "1")
    print(f"one by one: {one:.1f} s", flush=True)
    many = run_sweep(experiment, out / "ray", env, "--workers", str(args.workers))
    print(f"--workers {args.workers}: {many:.1f} s", flush=True)
    print(f"ratio: {many / one:.2f}; identical tables: {same_tables(out / 'one', out / 'ray')}")
    if args.cluster:
        ray = str(VENV_BIN / "ray")
        temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        port = "6390"
        subprocess.run([ray, "start", "--head", "--port", port, "--temp-dir", temp], check=True)
        try:
            cluster_env = env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
            workers = ("--workers", str(args.workers))
            wall = run_sweep(experiment, out / "cluster", cluster_env, *workers)
        finally:
            subprocess.run([ray, "stop", "--force"], check=False)
        same = same_tables(out / "one", out / "cluster")
        print(f"RAY_ADDRESS cluster, --workers {args.workers}: {wall:.1f} s; identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
