"""How the Flower simulation scales with the number of partitions (clients in the population)
and of clients sampled per round.

Each row is one ``scripts/flwr_run.sh`` run (``flwr run .`` on Ray, 2 client actors): the
vit-cpu preset on Fashion-MNIST, ADC at 0.1, SplitFed, IID partitions, ``--rounds`` rounds of
``--local-steps`` steps. By default the population is ``num-partitions`` (pooled clients: as
many SuperNodes as a round draws, which run whichever clients are drawn);
``--one-node-per-partition`` instead starts a SuperNode per partition (``num-partitions = 0``),
which asks every node which partition it holds. Rows past 60 000 partitions need more images
than Fashion-MNIST's 60 000: every row then trains on its training set written twice (IDX
files in a temporary ``data-dir``), so that all rows read the same data. Recorded per row:

- start-up: seconds from launching the script until the ServerApp has drawn round 1's
  clients and knows where each runs (Flower + Ray start, node registration, model build, the
  population's profiles and partitions; with one node per partition, ``query.info`` to every
  node, shown apart);
- round 1: its wall seconds (each Ray actor's first message imports torch and builds its
  model; with one node per partition that was paid while asking the nodes);
- per round: median wall seconds of the rounds after the first (the first pays each
  actor's imports); per exchange: that divided by the round's exchanges (1 + local steps);
- peak memory: the largest sum, over one sample, of the proportional set size (PSS: shared
  pages split between the processes sharing them) of every process the script started
  (SuperLink, the simulation process with the ServerApp, Ray and its workers), sampled
  every second; and the peak of the simulation process alone.

    python benchmarks/bench_scale.py [--rows 10:10,1000:100,10000:100,100000:100]
                                     [--rounds 3] [--local-steps 5] [--one-node-per-partition]

Prints a markdown table for BENCHMARKS.md; each row also lands in ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import re
import shutil
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
ROUND_ONE = re.compile(r"round\s+1/\d+ \|")
POOLED_LINE = re.compile(r"(\d+) partitions \(num-partitions\), drawn clients run on")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiled_fashion_mnist(folder: Path, copies: int) -> Path:
    """Fashion-MNIST with its training set written ``copies`` times (plain IDX files; the
    test set as it is): a population of more than 60 000 single-image clients."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, header in (("train-images-idx3-ubyte", 16), ("train-labels-idx1-ubyte", 8)):
        raw = gzip.decompress((FASHION_MNIST / f"{stem}.gz").read_bytes())
        count = int.from_bytes(raw[4:8], "big") * copies
        (folder / stem).write_bytes(
            raw[:4] + count.to_bytes(4, "big") + raw[8:header] + raw[header:] * copies
        )
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(FASHION_MNIST / f"{stem}.gz", folder / f"{stem}.gz")
    return folder


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
    partitions: int,
    sampled: int,
    rounds: int,
    local_steps: int,
    out: Path,
    extra: str = "",
    *,
    pooled: bool = True,
    data_dir: str = "",
) -> dict:
    name = f"scale-{partitions}-{sampled}" + (f"-{zlib.crc32(extra.encode())}" if extra else "")
    name += "-pooled" if pooled else ""
    eval_samples = "" if "eval-samples" in extra else "eval-samples=1000"
    nodes = sampled if pooled else partitions
    run_config = (
        f"num-server-rounds={rounds} local-steps={local_steps} {eval_samples} "
        f"{extra or SHAPES} fraction-train={sampled / partitions!r} min-nodes={nodes}"
        + (f" num-partitions={partitions}" if pooled else "")
        + (f" data-dir='{data_dir}'" if data_dir else "")
    )
    env = os.environ | {"OUT_DIR": str(out), "RUN_NAME": name}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    federation = f"num-supernodes={nodes} client-resources-num-cpus=1"
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
    startup = discovery = round1_at = None
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  {line.rstrip()}", file=sys.stderr)
        if startup is None and (match := DISCOVERY_LINE.search(line)):
            startup = time.perf_counter() - started
            discovery = float(match.group(2))
        if startup is None and POOLED_LINE.search(line):
            startup, discovery = time.perf_counter() - started, 0.0
        if round1_at is None and ROUND_ONE.search(line):
            round1_at = time.perf_counter() - started
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
        "supernodes": nodes,
        "pooled": pooled,
        "first_round_s": None if round1_at is None or startup is None else round1_at - startup,
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


def server_bytes_per_client(partitions: int, data_dir: str) -> float:
    """What the ServerApp keeps per client of the population (profiles, partition index
    arrays, the availability draw), measured in process with tracemalloc: bytes retained
    after the population's set-up and one round's draw, divided by the partitions."""
    import tracemalloc

    sys.path.insert(0, str(ROOT))
    from adc_flwr.config import RunConfig
    from adc_flwr.data import load_data
    from strategies.simulated_clients import SimulatedClients

    values = {"num-partitions": partitions, "out-dir": tempfile.mkdtemp(), "data-dir": data_dir}
    cfg = RunConfig.from_run_config(values)
    load_data(cfg.dataset, cfg.data_dir, cfg.classes)  # the data is not per client
    warm = SimulatedClients(cfg.replace(num_partitions=10), lambda: None, 1)
    warm.setup(10)  # imports and caches of any population, out of the count
    tracemalloc.start()
    clients = SimulatedClients(cfg, lambda: None, 1)
    clients.setup(partitions)
    clients.population.reachable(1)
    retained, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return retained / partitions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10:10,1000:100,10000:100,100000:100")
    parser.add_argument(
        "--one-node-per-partition",
        action="store_true",
        help="a SuperNode per partition (num-partitions = 0), as before pooled clients",
    )
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
    pooled = not (args.one_node_per_partition or args.deit)
    copies = math.ceil(max(p for p, *_ in specs) / 60000)
    data_dir = str(tiled_fashion_mnist(out / "data", copies)) if copies > 1 else ""
    rows = []
    for partitions, sampled, rounds, steps, extra in specs:
        row = run_row(
            partitions, sampled, rounds, steps, out, extra, pooled=pooled, data_dir=data_dir
        )
        row["rounds"], row["local_steps"] = rounds, steps
        row["state_bytes_per_client"] = state_bytes(extra)
        row["server_bytes_per_client"] = server_bytes_per_client(partitions, data_dir)
        rows.append(row)
        (out / "bench_scale.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)
    print(
        "| partitions | sampled / round | SuperNodes | start-up (s) | of it asking nodes (s) "
        "| round 1 (s) | round (s) | exchange (s) | peak PSS, all processes (GB) "
        "| peak PSS, simulation process (GB) | server bytes per client "
        "| context.state per client (MB) |"
    )
    print("|---" * 12 + "|")
    for r in rows:
        print(
            f"| {r['partitions']} | {r['sampled']} | {r['supernodes']} | "
            f"{r['startup_s']:.1f} | {r['discovery_s']:.1f} | {r['first_round_s']:.1f} | "
            f"{r['round_s']:.1f} | {r['exchange_s']:.2f} | {r['peak_pss_gb']:.2f} | "
            f"{r['peak_simulation_pss_gb']:.2f} | {r['server_bytes_per_client']:.0f} | "
            f"{r['state_bytes_per_client'] / 1e6:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
