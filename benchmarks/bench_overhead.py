"""What Flower costs: the same split-learning steps through `flwr run` and in a plain loop.

Both runs use C clients (``--clients``, 4 by default), the vit-cpu preset on Fashion-MNIST,
SplitFed, and the same front, compressor and back code (adc_flwr.training). The plain loop
calls the client and server workers directly in one process (with the same
recompute-on-backward protocol) and does no serialisation; the Flower run goes through Ray
actors (one per core), messages and the codec. Per-step wall times come from metrics.csv
(Flower) and perf_counter (plain); Ray start-up and evaluation are excluded from both.

One step is one exchange: the server sends each of the C clients its message and waits for
all replies. The overhead per exchange is the median Flower step minus the median plain step,
printed beside what the engine's dispatch makes an exchange wait before a client starts:
``--dispatch tick`` is Flower's own loop (a 0.1 s tick, 50 ms on average), ``event`` the
dispatch of :mod:`clients.engine_dispatch` (this project's default; it wakes when a message is
stored).

    python benchmarks/bench_overhead.py [--steps 20] [--methods none,adc] [--clients 4,16]
        [--dispatch event,tick]

Last line: ``flower_overhead_ratio=<median Flower step / median plain step>`` for ADC, at the
first client count and dispatch.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adc_flwr.config import RunConfig  # noqa: E402
from adc_flwr.training.modules import make_optimizer  # noqa: E402
from adc_flwr.training.workers import ClientWorker  # noqa: E402
from adc_flwr.wire.codec import ReceivedPacket  # noqa: E402
from clients.engine_dispatch import DISPATCH_ENV  # noqa: E402
from clients.node_cache import client_setup  # noqa: E402
from simulations.inprocess_grid import set_task_identity  # noqa: E402
from strategies.lifecycle import build_strategy  # noqa: E402

TICK_WAIT_S = {"tick": 0.05, "event": 0.0}  # the dispatch's average wait per exchange


def run_config(method: str, steps: int) -> dict:
    return {
        "method": method,
        # the shapes BENCHMARKS.md's figures were measured with (the defaults until then)
        "patch-size": 4,
        "batch-size": 64,
        "num-server-rounds": 1,
        "local-steps": steps,
        "eval-samples": 200,
    }


def flower_step_times(
    method: str, steps: int, clients: int, dispatch: str, out_dir: Path
) -> tuple[list[float], float]:
    """Per-step seconds of a `flwr run` (from metrics.csv) and the whole command's seconds."""
    pairs = " ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
        for k, v in run_config(method, steps).items()
    )
    name = f"overhead-{method}-{clients}-{dispatch}"
    env = os.environ | {"OUT_DIR": str(out_dir), "RUN_NAME": name, DISPATCH_ENV: dispatch}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            "bash",
            "scripts/flwr_run.sh",
            pairs,
            f"num-supernodes={clients} client-resources-num-cpus=1",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    total = time.perf_counter() - t0
    metrics = pd.read_csv(out_dir / name / "metrics.csv")
    wall = metrics.loc[metrics["kind"] == "step", "wall_time_s"].to_numpy()
    return list(wall[1:] - wall[:-1]), total


def plain_step_times(method: str, steps: int, clients: int) -> list[float]:
    """The same steps with the workers called directly, no Flower, no serialisation."""
    set_task_identity()
    cfg = RunConfig.from_run_config(run_config(method, steps) | {"out-dir": tempfile.mkdtemp()})
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    server = strategy.server
    workers, setups = [], []
    for pid in range(clients):
        setup = client_setup(cfg, pid, clients)
        front = copy.deepcopy(strategy.client_modules["front"])
        compressor = setup.skeleton.compressor
        opt = make_optimizer(list(front.parameters()), cfg)
        workers.append(ClientWorker(front, compressor, opt, setup.data.train, setup.skeleton.spec))
        setups.append(setup)

    def forward(step: int) -> list:
        return [
            w.forward_packet(s.batch_indices(step), s.encode_seed(1, step))
            for w, s in zip(workers, setups, strict=True)
        ]

    packets = forward(0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        received = [
            ReceivedPacket(
                {k: v.detach().float().requires_grad_() for k, v in p.tensors.items()},
                p.targets,
                p.soft_targets,
            )
            for p in packets
        ]
        _, grads, _ = server.step(received)
        for w, s, p, g in zip(workers, setups, packets, grads, strict=True):
            w.apply_grads(s.batch_indices(step), s.encode_seed(1, step), p.plan, g)
        if step + 1 < steps:
            packets = forward(step + 1)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default="none,adc")
    parser.add_argument("--clients", default="4", help="client counts, e.g. 4,16")
    parser.add_argument("--dispatch", default="event", help="tick, event or both: event,tick")
    args = parser.parse_args()
    dispatches = args.dispatch.split(",")
    if unknown := set(dispatches) - set(TICK_WAIT_S):
        parser.error(f"--dispatch: unknown {sorted(unknown)}; choose from {sorted(TICK_WAIT_S)}")
    torch.set_num_threads(os.cpu_count() or 1)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (int(c) for c in args.clients.split(",")):
            for method in args.methods.split(","):
                plain = statistics.median(plain_step_times(method, args.steps, clients))
                for dispatch in dispatches:
                    times, total = flower_step_times(
                        method, args.steps, clients, dispatch, Path(tmp)
                    )
                    flower = statistics.median(times)
                    ratio = flower / plain
                    ratios.append((method, ratio))
                    print(
                        f"{method:>5}: {clients:>3} clients, {args.steps} steps, dispatch "
                        f"{dispatch:<5} | flwr run step median {flower * 1e3:.0f} ms | plain "
                        f"loop step median {plain * 1e3:.0f} ms | overhead per exchange "
                        f"{(flower - plain) * 1e3:.0f} ms (the dispatch's average wait "
                        f"{TICK_WAIT_S[dispatch] * 1e3:.0f} ms) | ratio {ratio:.2f} | whole flwr "
                        f"run command {total:.1f} s (Ray start-up and evaluation included)",
                        flush=True,
                    )
    adc = [r for m, r in ratios if m == "adc"]
    print(f"flower_overhead_ratio={(adc or [ratios[0][1]])[0]:.3f}")


if __name__ == "__main__":
    main()
