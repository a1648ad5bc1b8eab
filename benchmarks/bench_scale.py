"""How the Flower simulation scales with the number of partitions (SuperNodes) and of clients
sampled per round.

Each row is one ``scripts/flwr_run.sh`` run (``flwr run .`` on Ray, 2 client actors): the
vit-cpu preset on Fashion-MNIST, ADC at 0.1, SplitFed, IID partitions, ``--rounds`` rounds of
``--local-steps`` steps. Recorded per row:

- start-up: seconds from launching the script until the ServerApp knows which node holds
  which partition (Flower + Ray start, node registration, model build, ``query.info`` to
  every node; the part spent asking nodes is shown apart);
- per round: median wall seconds of the rounds after the first (the first pays each
  actor's imports); per exchange: that divided by the round's exchanges (1 + local steps);
- peak memory: the largest sum, over one sample, of the proportional set size (PSS: shared
  pages split between the processes sharing them) of every process the script started
  (SuperLink, the simulation process with the ServerApp, Ray and its workers), sampled
  every second; and the peak of the simulation process alone.

    python benchmarks/bench_scale.py [--rows 10:10,100:10,1000:10,1000:100,10000:100]
                                     [--rounds 3] [--local-steps 5]

Prints a markdown table for BENCHMARKS.md; each row also lands in ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DISCOVERY_LINE = re.compile(r"(\d+) node\(s\) hold partitions .* \(asked in ([\d.]+) s\)")


def tree_memory(root: psutil.Process) -> tuple[float, float]:
    """(PSS of ``root`` and all its descendants, PSS of the flwr-simulation process), bytes."""
    total = simulation = 0.0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for proc in processes:
        try:
            pss = proc.memory_full_info().pss
            if "flwr-simulation" in " ".join(proc.cmdline()):
                simulation += pss
            total += pss
        except psutil.Error:
            continue
    return total, simulation


def run_row(
    partitions: int, sampled: int, rounds: int, local_steps: int, out: Path, extra: str = ""
) -> dict:
    name = f"scale-{partitions}-{sampled}" + (f"-{zlib.crc32(extra.encode())}" if extra else "")
    eval_samples = "" if "eval-samples" in extra else "eval-samples=1000"
    run_config = (
        f"num-server-rounds={rounds} local-steps={local_steps} {eval_samples} "
        f"{extra or SHAPES} "
        f"fraction-train={sampled / partitions!r} min-nodes={partitions}"
    )
    env = os.environ | {"OUT_DIR": str(out), "RUN_NAME": name}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    federation = f"num-supernodes={partitions} client-resources-num-cpus=1"
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "scripts/flwr_run.sh", run_config, federation],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = {"total": 0.0, "simulation": 0.0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.wait(1.0):
            total, simulation = tree_memory(root)
            peak["total"] = max(peak["total"], total)
            peak["simulation"] = max(peak["simulation"], simulation)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    startup = discovery = None
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  {line.rstrip()}", file=sys.stderr)
        if startup is None and (match := DISCOVERY_LINE.search(line)):
            startup = time.perf_counter() - started
            discovery = float(match.group(2))
    proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: flwr_run.sh exited {proc.returncode}")
    summary = json.loads((out / name / "summary.json").read_text())
    ends = [row["wall_time_s"] for row in summary["history"]]
    round_s = [b - a for a, b in itertools.pairwise(ends)] or ends  # rounds after the first
    per_round = statistics.median(round_s)
    return {
        "partitions": partitions,
        "sampled": sampled,
        "config": extra,
        "clients_trained": [row["clients"] for row in summary["history"]],
        "startup_s": startup,
        "discovery_s": discovery,
        "round_s": per_round,
        "exchange_s": per_round / (local_steps + 1),
        "peak_pss_gb": peak["total"] / 1e9,
        "peak_simulation_pss_gb": peak["simulation"] / 1e9,
        "wall_s": wall,
        "status": summary["status"],
    }


DEIT = "model='deit-tiny' batch-size=4 lr=0.001 eval-samples=200 eval-batch-size=50"
# the vit-cpu shapes BENCHMARKS.md's figures were measured with (the defaults until then)
SHAPES = "patch-size=4 batch-size=64 lr=0.001"


def state_bytes(extra: str) -> int:
    """Bytes of one client's ``context.state`` after a round (what travels to its actor and
    back with its next message, and what the simulation keeps for it), measured in process."""
    import pickle

    from flwr.common.config import parse_config_args

    sys.path.insert(0, str(ROOT))
    from adc_flwr.config import RunConfig
    from clients import client_app
    from simulations.inprocess_grid import InProcessGrid
    from strategies.lifecycle import build_strategy

    values = parse_config_args([f"{extra} num-server-rounds=1 local-steps=1"])
    cfg = RunConfig.from_run_config(values | {"out-dir": tempfile.mkdtemp()})
    grid = InProcessGrid(client_app.app, 1, cfg.to_run_config())
    strategy, arrays = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    strategy.sampler.settle_s = 0.0
    strategy.start(grid, arrays, num_rounds=1, timeout=600)
    (context,) = grid.contexts.values()
    return len(pickle.dumps(context.state))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10:10,100:10,1000:10,1000:100,10000:100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument(
        "--deit",
        action="store_true",
        help="instead: DeiT-Tiny (224 px, batch 4), 1000 partitions, 100 sampled, 10 rounds "
        "of 1 step, with client-optimizer keep and reset",
    )
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{psutil.cpu_count()} cores, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.deit:
        specs = [(1000, 100, 10, 1, f"{DEIT} client-optimizer='{m}'") for m in ("reset", "keep")]
    else:
        specs = [
            (*(int(x) for x in spec.split(":")), args.rounds, args.local_steps, "")
            for spec in args.rows.split(",")
        ]
    rows = []
    for partitions, sampled, rounds, steps, extra in specs:
        row = run_row(partitions, sampled, rounds, steps, out, extra)
        row["rounds"], row["local_steps"] = rounds, steps
        row["state_bytes_per_client"] = state_bytes(extra)
        rows.append(row)
        (out / "bench_scale.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)
    print(
        "| partitions | sampled / round | config | start-up (s) | of it asking nodes (s) "
        "| round (s) | exchange (s) | peak PSS, all processes (GB) "
        "| peak PSS, simulation process (GB) | context.state per client (MB) |"
    )
    print("|---" * 10 + "|")
    for r in rows:
        print(
            f"| {r['partitions']} | {r['sampled']} | {r['config'] or 'vit-cpu'} | "
            f"{r['startup_s']:.1f} | {r['discovery_s']:.1f} | {r['round_s']:.1f} | "
            f"{r['exchange_s']:.2f} | {r['peak_pss_gb']:.2f} | "
            f"{r['peak_simulation_pss_gb']:.2f} | {r['state_bytes_per_client'] / 1e6:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
