"""What the simulated population costs in wall time: steps on the ``edge`` mix against
``uniform``.

Same run (Fashion-MNIST, vit-cpu, ADC at 0.1, SplitFed over 10 in-process clients, all
sampled, ``--rounds`` rounds of ``--steps`` steps) with three populations, interleaved
``--repeats`` times so that drift of the machine hits all alike:

- ``uniform``: the default;
- ``edge, all stay``: the edge mix's links and devices with availability 1 and no drop-out,
  so the very same clients train and only the clock's work is added;
- ``edge``: the mix as it is (unavailable clients and drop-outs change who trains).

Per run: the median wall seconds of a step (consecutive ``kind=step`` rows of metrics.csv
within a round; the first step of each round, which also pays the round start, excluded).
Printed: a markdown table of the medians over runs and their ratio to ``uniform``.

    python benchmarks/bench_clock.py [--rounds 2] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adc_flwr.config import RunConfig  # noqa: E402
from adc_flwr.population.profiles import assign_profiles, write_profiles  # noqa: E402
from adc_flwr.run.run_dir import RunDir  # noqa: E402
from clients import client_app  # noqa: E402
from simulations.inprocess_grid import InProcessGrid  # noqa: E402
from strategies.lifecycle import run_training  # noqa: E402

CLIENTS = 10


def step_seconds(run_dir: Path) -> float:
    steps = RunDir(run_dir).read_metrics().query("kind == 'step'")
    deltas = [
        later - earlier
        for _, rows in steps.groupby("round")
        for earlier, later in zip(rows["wall_time_s"], rows["wall_time_s"].iloc[1:], strict=False)
    ]
    return statistics.median(deltas)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-clock-"))
    stay = [
        dataclasses.replace(p, availability=1.0, dropout=0.0)
        for p in assign_profiles("edge", CLIENTS, seed=42)
    ]
    write_profiles(out / "edge-stay.csv", stay)
    variants = {
        "uniform": {},
        "edge, all stay": {"profile-trace": str(out / "edge-stay.csv")},
        "edge": {"profile-mix": "edge"},
    }
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            run_name = f"{name.replace(', ', '-').replace(' ', '-')}-{repeat}"
            cfg = RunConfig.from_run_config(
                {
                    "method": "adc",
                    # the shapes BENCHMARKS.md's figures were measured with
                    "patch-size": 4,
                    "batch-size": 64,
                    "lr": 1e-3,
                    "num-server-rounds": args.rounds,
                    "local-steps": args.steps,
                    "eval-samples": 500,
                    "out-dir": str(out),
                    "run-name": run_name,
                    **extra,
                }
            )
            grid = InProcessGrid(client_app.app, CLIENTS, cfg.to_run_config())
            run_training(grid, cfg, progress=lambda _: None)
            seconds[name].append(step_seconds(cfg.run_dir))
            print(f"{run_name}: {seconds[name][-1] * 1000:.1f} ms per step", flush=True)
    base = statistics.median(seconds["uniform"])
    print("\n| population | step, median of runs (ms) | runs (ms) | against uniform |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"| {name} | {median * 1000:.1f} | {runs} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
