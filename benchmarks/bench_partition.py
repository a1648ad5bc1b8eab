"""How long partitioning a Fashion-MNIST-sized label array takes, per partitioner.

60 000 seeded random labels of 10 classes, split into ``--partitions`` clients by each of
``iid``, ``dirichlet``, ``pathological`` and ``shard`` at their defaults (what every ClientApp
process derives from the seed: docs/population.md). Each repeat uses another seed, so the
per-process cache of :func:`adc_flwr.data.partition_indices` never answers; one warm-up call
loads flwr-datasets and ``datasets`` first. Printed: a markdown table of the median and worst
seconds per partitioner, and the target (2 s each, the figure the test suite used to check).

    python benchmarks/bench_partition.py [--labels 60000] [--partitions 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adc_flwr import data as D

TARGET_S = 2.0


def seconds(labels: np.ndarray, partitions: int, name: str, seed: int) -> float:
    started = time.perf_counter()
    D.partition_indices(labels, partitions, name, seed=seed)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=60_000)
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    labels = np.random.default_rng(3).integers(0, 10, args.labels).astype(np.int64)
    D.partition_indices(labels[:100], 2, "iid")  # imports out of the timing
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\n| partitioner | median (s) | worst (s) | target |\n|---|---|---|---|")
    for name in D.PARTITIONERS:
        runs = [seconds(labels, args.partitions, name, 100 + r) for r in range(args.repeats)]
        print(
            f"| {name} | {statistics.median(runs):.3f} | {max(runs):.3f} | "
            f"{'met' if max(runs) < TARGET_S else 'MISSED'} (< {TARGET_S:g} s) |"
        )


if __name__ == "__main__":
    main()
