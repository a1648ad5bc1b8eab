"""What `privacy-eval = final` adds to a Fashion-MNIST run on this machine.

The main job's shape shortened (vit-cpu preset, 2 in-process clients, 2 rounds of 50 steps,
batch 128): the same run with the audit off and at `final`, alternated `--repeats` times in
fresh run directories, each in process with the machine's torch threads. Prints each run's
wall seconds, the audit's own seconds (``privacy.csv``), and the medians: what the audit
adds, for ADC 0.1 (split 3, the default) and `none` split after block 1.

    python benchmarks/bench_privacy.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from simulations.sweep import run_point_inprocess

BASE = {
    "dataset": "fashion-mnist",
    "num-server-rounds": 2,
    "local-steps": 50,
    "batch-size": 128,
    "eval-samples": 2000,
}
CASES = {"adc-0.1-split3": {"method": "adc"}, "none-split1": {"method": "none", "split-index": 1}}


def timed_run(root: Path, name: str, **keys: object) -> tuple[float, float]:
    """Wall seconds of one run, and the audit's own seconds (0 when off)."""
    cfg = RunConfig.from_run_config(BASE | keys | {"out-dir": str(root), "run-name": name})
    started = time.perf_counter()
    summary = run_point_inprocess(cfg, 2, lambda _: None)
    wall = time.perf_counter() - started
    if summary.get("status") != "completed":
        raise RuntimeError(f"{name}: {summary.get('status')} {summary.get('error')}")
    audit = RunDir(cfg.run_dir).read_privacy()
    return wall, float(audit["wall_time_s"].iloc[0]) if len(audit) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case, keys in CASES.items():
            walls: dict[str, list[float]] = {"off": [], "final": []}
            audits = []
            for i in range(args.repeats):
                for mode in ("off", "final"):
                    wall, audit = timed_run(
                        Path(tmp), f"{case}-{mode}-{i}", **keys, **{"privacy-eval": mode}
                    )
                    walls[mode].append(wall)
                    if mode == "final":
                        audits.append(audit)
                    print(f"{case} {mode:5s} run {i + 1}: {wall:6.1f} s (audit {audit:.1f} s)")
            off, final = statistics.median(walls["off"]), statistics.median(walls["final"])
            print(
                f"{case}: median off {off:.1f} s, final {final:.1f} s, added {final - off:.1f} s; "
                f"the audit itself {statistics.median(audits):.1f} s (median of {args.repeats})"
            )


if __name__ == "__main__":
    main()
