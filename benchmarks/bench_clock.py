"""What the simulated population costs in wall time: steps on the ``edge`` mix against
``uniform``.

Same run (Fashion-MNIST, vit-cpu, ADC at 0.1, SplitFed over 10 in-process clients, all
sampled, ``--rounds`` rounds of ``--steps`` steps) with three populations, interleaved
``--repeats`` times so that drift of the machine hits all alike:

- ``uniform``: the default;
- ``edge, all stay``: the edge mix's links and devices with availability 1 and no drop-out,
  so the very same clients train and only the clock's work is added;
- ``edge``: the mix as it is (unavailable clients and drop-outs change who trains);
- ``lte, static links`` and ``lte, traced links``: every client the `lte` class, all
  reachable, none dropping out, with constant links or with the `edge_traces` study's
  recorded-style lte traces of the same means (each client at its own offset), so the very
  same clients train and only the trace lookups are added.

Per run: the median wall seconds of a step (consecutive ``kind=step`` rows of metrics.csv
within a round; the first step of each round, which also pays the round start, excluded).
Printed: a markdown table of the medians over runs and their ratio to ``uniform``.

    python benchmarks/bench_clock.py [--rounds 2] [--steps 20] [--repeats 3] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adc_flwr.config import RunConfig  # noqa: E402
from adc_flwr.population.clock import SimClock, Turn  # noqa: E402
from adc_flwr.population.profile_csv import read_trace, write_profiles  # noqa: E402
from adc_flwr.population.profiles import Population, assign_profiles  # noqa: E402
from adc_flwr.run.run_dir import RunDir  # noqa: E402
from clients import client_app  # noqa: E402
from simulations.edge_traces import TRACES  # noqa: E402
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


def exchange_microseconds(profiles: list, exchanges: int = 20_000) -> float:
    """The clock alone: microseconds per SplitFed exchange of these clients (median of 5)."""
    turns = [Turn(p, 200_000 + 997 * p, 30_000 + 13 * p, 2e9) for p in range(len(profiles))]
    times = []
    for _ in range(5):
        clock = SimClock(Population(profiles, 0), server_gflops=100.0)
        started = time.perf_counter()
        for _ in range(exchanges):
            clock.exchange(turns)
            clock.server_step(1e9)
        times.append((time.perf_counter() - started) / exchanges * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="population names to run (default: all)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-clock-"))
    stay = [
        dataclasses.replace(p, availability=1.0, dropout=0.0)
        for p in assign_profiles("edge", CLIENTS, seed=42)
    ]
    write_profiles(out / "edge-stay.csv", stay)
    traced = [p for p in read_trace(TRACES / "edge_traced.csv") if p.name == "lte"]
    static = [dataclasses.replace(p, uplink_trace=None, downlink_trace=None) for p in traced]
    write_profiles(out / "lte-traced.csv", traced)
    write_profiles(out / "lte-static.csv", static)
    variants = {
        "uniform": {},
        "edge, all stay": {"profile-trace": str(out / "edge-stay.csv")},
        "edge": {"profile-mix": "edge"},
        "lte, static links": {"profile-trace": str(out / "lte-static.csv")},
        "lte, traced links": {"profile-trace": str(out / "lte-traced.csv")},
    }
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"--only {unknown}: not a population here; one of {list(variants)}")
        variants = {name: extra for name, extra in variants.items() if name in args.only}
    lte = {"static": static, "traced": traced}
    for kind, rows in lte.items():
        profiles = assign_profiles("uniform", CLIENTS, seed=42, rows=rows)
        micro = exchange_microseconds(profiles)
        print(f"clock alone, lte {kind} links: {micro:.1f} µs per exchange", flush=True)
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
    reference = next(iter(seconds))  # uniform, unless --only leaves it out
    base = statistics.median(seconds[reference])
    print(f"\n| population | step, median of runs (ms) | runs (ms) | against {reference} |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"| {name} | {median * 1000:.1f} | {runs} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
