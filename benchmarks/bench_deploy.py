"""What one exchange costs on Flower's Deployment Runtime: `scripts/deploy_local.sh` with N
SuperNodes on loopback, over TLS, one round of S steps.

Flower 1.41 starts a new `flwr-clientapp` process for every message a SuperNode receives,
and a SuperNode with nothing to do looks again only after 3 s
(`flwr/supernode/start_client_internal.py`, `time.sleep(3)`); those are the runtime's floor.
Per-exchange seconds are the differences between consecutive step rows of metrics.csv (the
first step, which carries the run's start, is left out); the whole command is timed apart.

    python benchmarks/bench_deploy.py [--nodes 2] [--steps 4] [--variants ours,nocache]

``ours`` is the deployment as shipped (the per-node disk cache, ``ADC_NODE_CACHE``);
``nocache`` the same without it (each message decodes and partitions the data again).
``--process K`` measures instead what one message's process costs, K times alternately
with and without the disk cache: a fresh interpreter importing what `flwr-clientapp`
imports, then the ClientApp, then the client's setup.

Last line: ``deploy_exchange_s=<median seconds per exchange>`` of the first variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ours": {},
    "nocache": {"ADC_NODE_CACHE": ""},
}


def exchange_times(
    nodes: int, steps: int, variant: str, out_dir: Path
) -> tuple[list[float], float]:
    """Per-exchange seconds of one deployment run and the whole command's seconds."""
    run_config = (
        f"dataset='fashion-mnist' num-server-rounds=1 local-steps={steps} eval-samples=256 "
        f"out-dir='{out_dir}' run-name='deploy-{variant}'"
    )
    env = os.environ | VARIANTS[variant]
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    t0 = time.perf_counter()
    subprocess.run(
        ["bash", "scripts/deploy_local.sh", str(nodes), run_config],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    total = time.perf_counter() - t0
    metrics = pd.read_csv(out_dir / f"deploy-{variant}" / "metrics.csv")
    wall = metrics.loc[metrics["kind"] == "step", "wall_time_s"].to_numpy()
    return list(wall[1:] - wall[:-1]), total


PROCESS = """
import time
t0 = time.perf_counter()
import flwr.supernode.runtime.run_clientapp
t1 = time.perf_counter()
import clients.client_app
t2 = time.perf_counter()
from adc_flwr.config import RunConfig
from clients.node_cache import client_setup
cfg = RunConfig.from_run_config({"dataset": "fashion-mnist", "out-dir": "/tmp/unused"})
client_setup(cfg, 0, 2)
print(t1 - t0, t2 - t1, time.perf_counter() - t2)
"""


def process_cost(runs: int) -> None:
    """Medians of one ClientApp process's parts, with and without the disk cache."""
    rows: dict[str, list[list[float]]] = {"no disk cache": [], "disk cache": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(runs):
            for name, value in (("no disk cache", ""), ("disk cache", cache)):
                t0 = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", PROCESS],
                    cwd=ROOT,
                    env=os.environ | {"ADC_NODE_CACHE": value},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                rows[name].append([time.perf_counter() - t0, *map(float, out)])
    for name, parts in rows.items():
        total, flwr, app, setup = (statistics.median(c) for c in zip(*parts, strict=True))
        print(
            f"{name:>13}: process {total:.2f} s | flwr's clientapp imports {flwr:.2f} s | "
            f"app imports {app:.2f} s | client setup {setup:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default="ours")
    parser.add_argument("--process", type=int, default=0, help="measure one process, K times")
    args = parser.parse_args()
    if args.process:
        process_cost(args.process)
        return
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    medians = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            times, total = exchange_times(args.nodes, args.steps, variant, Path(tmp))
            medians.append(statistics.median(times))
            print(
                f"{variant:>6}: {args.nodes} SuperNodes, 1 round of {args.steps} steps | per "
                f"exchange median {medians[-1]:.1f} s (min {min(times):.1f}, max "
                f"{max(times):.1f}) | whole deploy_local.sh command {total:.0f} s",
                flush=True,
            )
    print(f"deploy_exchange_s={medians[0]:.2f}")


if __name__ == "__main__":
    main()
