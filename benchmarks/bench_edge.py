"""Methods on heterogeneous edge clients: the ``edge_mix`` experiment, summarised.

Runs (or resumes) ``python -m simulations.sweep edge_mix`` (20 clients on the ``edge`` mix,
Fashion-MNIST split by Dirichlet 0.5; ``none``, ADC 0.1, Top-K 0.1, 2-bit quantisation and
adaptive ADC; 3 seeds), then prints one markdown row per method with the mean ± standard
deviation over seeds of: final test accuracy, MB on the wire (up + down + model sync), the
simulated duration of the run, and the simulated minutes until an evaluation first reached
``--target`` test accuracy (over the seeds that reached it, and how many did).

    python benchmarks/bench_edge.py [--results-root results] [--target 0.6]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.collect import collect, curves  # noqa: E402

EXPERIMENT = "edge_mix"


def label(row: pd.Series) -> str:
    if row.get("adaptive-compression") in (True, "True", "true"):
        return f"adaptive adc (ξ ≤ {row['compression']:g})"
    if row["method"] == "quant":
        return f"quant {int(row['quant-bits'])} bits"
    if row["method"] == "none":
        return "none"
    return f"{row['method']} {row['compression']:g}"


def mean_std(values: pd.Series, fmt: str) -> str:
    values = values.dropna()
    if values.empty:
        return "not reached"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=1), fmt)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-root", type=Path, default=ROOT / "results")
    parser.add_argument("--target", type=float, default=0.6)
    args = parser.parse_args()
    sweep = [sys.executable, "-m", "simulations.sweep", EXPERIMENT]
    done = subprocess.run([*sweep, "--results-root", str(args.results_root)], cwd=ROOT)
    if done.returncode != 0:
        print(f"the sweep did not complete (exit {done.returncode})", file=sys.stderr)
        return done.returncode
    results = args.results_root / EXPERIMENT
    table = collect(results)
    evals = curves(results)
    reached = evals[evals["test_accuracy"] >= args.target].groupby("run")["sim_time_s"].min() / 60
    table = table[table["status"] == "completed"].copy()
    table["label"] = table.apply(label, axis=1)
    table["minutes_to_target"] = table["run"].map(reached)
    table["sim_minutes"] = table["sim_time_s"] / 60
    print(
        f"\n| method | seeds | final accuracy | MB on the wire | simulated minutes "
        f"| simulated minutes to {args.target:.2f} accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for name, group in table.groupby("label", sort=False):
        hit = group["minutes_to_target"].notna().sum()
        print(
            f"| {name} | {len(group)} | {mean_std(group['test_accuracy'], '.3f')} "
            f"| {mean_std(group['mb_total'], '.0f')} | {mean_std(group['sim_minutes'], '.1f')} "
            f"| {mean_std(group['minutes_to_target'], '.1f')} ({hit} of {len(group)} seeds) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
