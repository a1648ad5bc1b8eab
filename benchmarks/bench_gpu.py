"""Split-learning steps per second and peak memory on one GPU: DeiT-Tiny, batch 128.

In process (the default): one client front and the server back on the same GPU, run by the
project's own ``ClientWorker`` / ``ServerWorker`` and compressors, one exchange per step as
the ClientApp does it: the packet goes up through the wire (the codec when Flower is
installed, else the same CPU round trip: ``.cpu().numpy()`` and back), the server steps, the
gradients come down the same way, the client replays its forward with the plan (kept on the
CPU, as ``context.state`` keeps it), steps, and forwards the next batch. The optimizers are
built as a run builds them: the client's over its front and a learned method's encoder, the
server's over the back and its decoder (BottleNet++ trains both in the timed steps). A
step's time runs from one packet to the next (``torch.cuda.synchronize`` at both ends); the
median over the timed steps after warm-up is reported, with
``torch.cuda.max_memory_allocated`` of the whole configuration. Data: seeded random uint8
images, made here (nothing is downloaded). Needs numpy, pandas, torch and transformers (the
project's model, data and compressor modules import them), not flwr, ray or datasets.

``--flwr``: the same shapes through ``scripts/flwr_run.sh`` with 4 clients sharing the GPU
(``benchmarks/bench_gpu_flwr.py``); needs the project's full environment (``pip install -e .``).

    python benchmarks/bench_gpu.py [--methods none,adc] [--precisions fp32,bf16]
                                   [--steps 30] [--warmup 5] [--out bench_gpu.json] [--flwr]
    python benchmarks/bench_gpu.py --cpu-smoke   # tiny shapes on the CPU: the code path only

Every method runs at ξ = 0.1: one the shapes cannot take (``c3sl``: R = 10 does not divide
the batch) is refused with the reason before anything runs (exit 2). Without a CUDA device
(and without ``--cpu-smoke``) it prints ``no CUDA device`` and exits 0. Prints a markdown
table; ``--out`` gets the rows as JSON with the card's name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu_flwr import missing_for_flwr, through_flwr  # noqa: E402

if TYPE_CHECKING:  # imported where used: "no CUDA device" answers in a second
    from adc_flwr.compression import Compressor
    from adc_flwr.config import RunConfig
    from adc_flwr.data import DataBundle

XI = 0.1
NUM_CLASSES = 10


@dataclass(frozen=True)
class Shapes:
    """Model and batch of one benchmark size."""

    model: str
    image_size: int
    patch_size: int
    batch: int
    split_index: int = 3
    lr: float = 1e-3  # what the project's DeiT rows were measured with


FULL = Shapes("deit-tiny", 224, 16, 128)  # 192 wide, 12 blocks, 3 heads: 197 tokens
SMOKE = Shapes("vit-cpu", 28, 7, 16)  # 64 wide, 6 blocks: 17 tokens, seconds on a CPU


# ---- the wire: the codec when Flower is there, else the same trip through the CPU ----------


@dataclass
class Received:
    """What ``ServerWorker.step`` reads of a received packet (``adc_flwr.wire.codec.ReceivedPacket``
    without importing Flower)."""

    tensors: dict[str, torch.Tensor]
    targets: torch.Tensor
    soft_targets: bool
    compressor: Compressor | None = field(default=None)


class Wire:
    """Packets up and gradients down, leaving through the CPU as the codec makes them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.codec = importlib.util.find_spec("flwr") is not None
        self.name = "codec" if self.codec else "cpu round trip (no flwr)"

    def up(self, packet: Any) -> Any:
        if self.codec:
            from adc_flwr.wire.codec import packet_to_record, record_to_packet

            return record_to_packet(packet_to_record(packet, "float32"), self.device)
        tensors = {
            k: self._trip(t).requires_grad_(t.is_floating_point())
            for k, t in packet.tensors.items()
        }
        return Received(tensors, self._trip(packet.targets), packet.soft_targets)

    def down(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.codec:
            from adc_flwr.wire.codec import grads_to_record, record_to_grads

            return record_to_grads(grads_to_record(grads, "float32"), self.device)
        return {k: self._trip(t) for k, t in grads.items()}

    def _trip(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float() if t.is_floating_point() else t.detach().long()
        return torch.from_numpy(t.cpu().numpy()).to(self.device)  # float32 / int64, as decoded


# ---- in process ------------------------------------------------------------------------------


def synthetic_bundle(shapes: Shapes, images: int, seed: int = 0) -> DataBundle:
    """Seeded random uint8 images (N, 3, S, S) and labels: the data pipeline's real input."""
    from adc_flwr.data import DataBundle, ImageSplit

    rng = np.random.default_rng(seed)
    size = shapes.image_size
    pixels = rng.integers(0, 256, size=(images, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=images).astype(np.int64)
    split = ImageSplit(pixels, labels)
    return DataBundle(
        train=split,
        test=split,
        num_classes=NUM_CLASSES,
        class_names=[str(c) for c in range(NUM_CLASSES)],
        num_channels=3,
        image_size=size,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(shapes: Shapes, method: str, precision: str, device: str) -> RunConfig:
    """The validated run config of one configuration."""
    from adc_flwr.config import RunConfig

    cfg = RunConfig(
        model=shapes.model,
        patch_size=shapes.patch_size,
        split_index=shapes.split_index,
        batch_size=shapes.batch,
        lr=shapes.lr,
        method=method,
        compression=XI,
        precision=precision,
        device=device,
    )
    cfg.validate()
    return cfg


def unfit(shapes: Shapes, methods: list[str], precisions: list[str]) -> list[str]:
    """Why a method or precision asked for cannot run at ``shapes`` and ξ = XI, one line each
    (building each compressor, as ``validate_run`` does); [] when all can."""
    from adc_flwr.compression import available_methods, build_compressor
    from adc_flwr.config import PRECISIONS
    from adc_flwr.model.vit import PRESETS

    known = available_methods()
    problems = [
        f"precision {p!r}: allowed values are {', '.join(PRECISIONS)}"
        for p in precisions
        if p not in PRECISIONS
    ]
    for method in methods:
        if method not in known:
            problems.append(f"method {method!r}: allowed values are {', '.join(known)}")
            continue
        try:
            cfg = bench_config(shapes, method, "fp32", "cpu")
            build_compressor(cfg, NUM_CLASSES, hidden_size=PRESETS[shapes.model]["hidden_size"])
        except ValueError as exc:  # ConfigError included
            problems.append(f"method {method!r} at xi={XI:g}, batch {shapes.batch}: {exc}")
    return problems


def in_process(
    shapes: Shapes, method: str, precision: str, device: torch.device, warmup: int, steps: int
) -> dict[str, Any]:
    """Median step time and peak memory of one client + the server back on ``device``."""
    from adc_flwr.compression import build_compressor
    from adc_flwr.model.inputs import InputSpec
    from adc_flwr.model.vit import build_model, split_vit
    from adc_flwr.training.modules import (
        client_modules,
        client_parameters,
        make_optimizer,
        server_parameters,
    )
    from adc_flwr.training.workers import ClientWorker, ServerWorker, step_seed

    cfg = bench_config(shapes, method, precision, str(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)  # as build_strategy: the same initial weights every time
    data = synthetic_bundle(shapes, images=4 * shapes.batch)
    vit = build_model(cfg, data).to(device)
    front, back = split_vit(vit, cfg.split_index)
    compressor = build_compressor(cfg, NUM_CLASSES, hidden_size=front.hidden_size).to(device)
    spec = InputSpec.for_model(vit, data)
    # the optimizers a run builds: the client's (clients/node_cache.py) over its front and a
    # learned method's encoder, the server's (build_strategy) over the back and the decoder
    client_params = client_parameters(client_modules(front, compressor))
    server_params = server_parameters(back, compressor)
    stepped = {id(p) for p in client_params + server_params}
    learned = [compressor.client_module(), compressor.server_module()]
    modules = [front, back, *(m for m in learned if m is not None)]
    if any(id(p) not in stepped for m in modules for p in m.parameters() if p.requires_grad):
        raise RuntimeError(f"{method}: a trainable parameter is in no optimizer")
    client = ClientWorker(
        front, compressor, make_optimizer(client_params, cfg), data.train, spec, precision
    )
    server = ServerWorker(back, compressor, make_optimizer(server_params, cfg), precision=precision)
    wire = Wire(device)
    batches = len(data.train) // shapes.batch

    def batch(step: int) -> tuple[np.ndarray, int]:
        start = (step % batches) * shapes.batch
        return np.arange(start, start + shapes.batch), step_seed(cfg.seed, 1, 0, step)

    idx, seed = batch(0)
    packet = client.forward_packet(idx, seed)
    times, losses = [], []
    for step in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        result = server.step([wire.up(packet)])
        plan = {k: v.cpu() for k, v in packet.plan.items()}  # as context.state keeps it
        client.apply_grads(idx, seed, plan, wire.down(result.grads[0]))
        idx, seed = batch(step + 1)
        packet = client.forward_packet(idx, seed)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(result.loss)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "mode": "in-process",
        "method": method,
        "compression": XI if method != "none" else 1.0,
        "precision": precision,
        "model": shapes.model,
        "tokens": front.num_tokens,
        "batch": shapes.batch,
        "split_index": shapes.split_index,
        "clients": 1,
        "wire": wire.name,
        "timed_steps": steps,
        "step_ms_median": median * 1e3,
        "steps_per_s": 1.0 / median,
        "client_steps_per_s": 1.0 / median,
        "peak_gpu_mb": None if peak is None else peak / 2**20,
        "final_loss": losses[-1],
    }


# ---- report ---------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | method | precision | clients | step (ms) | steps/s | client steps/s "
        "| peak GPU memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        method = r["method"] + (f" ξ={r['compression']:g}" if r["method"] != "none" else "")
        peak = "—" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(
            f"| {r['mode']} | {method} | {r['precision']} | {r['clients']} | "
            f"{r['step_ms_median']:.1f} | {r['steps_per_s']:.2f} | "
            f"{r['client_steps_per_s']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,adc")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--flwr", action="store_true", help="through flwr run, 4 clients")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, shapes, card = torch.device("cpu"), SMOKE, "cpu (smoke test)"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--cpu-smoke runs the code path on the CPU)")
        return 0
    else:
        device, shapes = torch.device("cuda"), FULL
        card = torch.cuda.get_device_name(device)
    if args.flwr and (missing := missing_for_flwr()):
        print(
            f"--flwr needs {', '.join(missing)} (the project's environment: pip install -e .); "
            "the in-process mode needs only numpy, pandas, torch and transformers",
            file=sys.stderr,
        )
        return 2
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    if problems := unfit(shapes, methods, precisions):
        print(
            f"error: not measurable at {shapes.model}, batch {shapes.batch}, xi={XI:g}; leave "
            "it out of --methods / --precisions:\n  " + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 2
    print(
        f"device: {card}; torch {torch.__version__}; {shapes.model}, batch {shapes.batch}, "
        f"split after block {shapes.split_index}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for method in methods:
            for precision in precisions:
                if args.flwr:
                    row = through_flwr(
                        shapes,
                        method,
                        XI,
                        precision,
                        args.warmup,
                        args.steps,
                        Path(tmp),
                        args.cpu_smoke,
                    )
                else:
                    row = in_process(shapes, method, precision, device, args.warmup, args.steps)
                row["device"] = card
                row["torch"] = torch.__version__
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": card, "rows": rows}, indent=2))
    print(table(rows))
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
