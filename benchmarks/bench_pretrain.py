"""What pretraining's loop costs per step: ``simulations.pretrain.train`` against a plain loop.

The same model and batch in three loops, each from the same seeded initialisation: the
``vit-cpu`` preset with 4 px patches (50 tokens) on Fashion-MNIST classes 1,3,5,7,8,9 (36 000
training images), batch 128, Adam at lr 1e-3.

- ``plain``: a plain PyTorch loop: the training split normalised once into one float tensor,
  random indices per step, forward, cross-entropy, backward, Adam. No augmentation, no
  progress bar, nothing kept per step.
- ``train``: pretrain's own ``train`` (``--augment none``): seeded batches through the data
  pipeline (uint8 -> float, normalise per batch), the loss and accuracy kept per step, the
  progress bar (written to /dev/null here).
- ``train + paper``: the same with ``--augment paper`` (RandAugment per image, colour
  jitter, flip: adc_flwr/data/augment.py).

A step runs from one iteration of the loop to the next (``train``'s from its progress bar's
iterations); the first ``--warmup`` steps of each loop are left out. The loops alternate
``--repeats`` times; printed are the median seconds per step of each over all its repeats,
the ratios to ``plain`` and, last, ``pretrain_step_ratio=<train median / plain median>``.

    python benchmarks/bench_pretrain.py [--steps 30] [--repeats 3] [--threads 0]

OMP_WAIT_POLICY defaults to PASSIVE here (as in bench_compression.py): with GNU OpenMP's
active spinning, another process on the cores makes every small parallel op wait out a time
slice. The load average is printed for the same reason.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simulations.pretrain as pretrain
from adc_flwr.data import DataBundle, load_data
from adc_flwr.data.augment import build_augment
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import build_vit

CLASSES = "1,3,5,7,8,9"
FLAGS = ["--dataset", "fashion-mnist", "--classes", CLASSES, "--model", "vit-cpu"]
FLAGS += ["--patch-size", "4", "--batch-size", "128", "--lr", "1e-3", "--seed", "0"]


class TimedBar(tqdm):
    """``train``'s progress bar, recording when each iteration (a step) starts."""

    stamps: ClassVar[list[float]] = []

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            TimedBar.stamps.append(time.perf_counter())
            yield item


def model(data: DataBundle) -> torch.nn.Module:
    """The seeded vit-cpu the pretraining builds (same init for every loop)."""
    return build_vit(
        "vit-cpu",
        num_classes=data.num_classes,
        image_size=data.image_size,
        num_channels=data.num_channels,
        patch_size=4,
        seed=0,
        class_names=list(data.class_names),
    )


def train_steps(data: DataBundle, steps: int, augment: str) -> list[float]:
    """Seconds per step of ``simulations.pretrain.train`` (all but the last step)."""
    args = pretrain.parse_args([*FLAGS, "--augment", augment, "--out", os.devnull])
    cfg = pretrain.recipe_config(args)
    vit = model(data)
    spec = InputSpec.for_model(vit, data)
    TimedBar.stamps = []
    with open(os.devnull, "w") as devnull:
        pretrain.tqdm = lambda *a, **kw: TimedBar(*a, **(kw | {"file": devnull}))
        try:
            pretrain.train(vit, data, spec, cfg, steps + 1, build_augment(cfg.augment))
        finally:
            pretrain.tqdm = tqdm
    return [b - a for a, b in itertools.pairwise(TimedBar.stamps)]


def plain_steps(data: DataBundle, steps: int) -> list[float]:
    """Seconds per step of a plain loop over the pre-normalised split (no pipeline)."""
    vit = model(data)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    images = torch.from_numpy(np.array(data.train.images)).float().div_(255)  # (N, 1, 28, 28)
    images = (images - mean) / std
    labels = torch.from_numpy(np.array(data.train.labels)).long()  # (N,)
    optimizer = torch.optim.Adam(vit.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        idx = torch.randint(0, len(labels), (128,), generator=g)
        loss = F.cross_entropy(vit(pixel_values=images[idx]).logits, labels[idx])  # (B, C)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop and repeat")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at each start")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the cores available")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores or 1)
    started = time.perf_counter()
    data = load_data("fashion-mnist", "", CLASSES)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} of {cores} cores, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {load}; "
        f"{len(data.train)} training images loaded in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    loops = {
        "plain": lambda n: plain_steps(data, n),
        "train": lambda n: train_steps(data, n, "none"),
        "train + paper": lambda n: train_steps(data, n, "paper"),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(args.repeats):
        for name, loop in loops.items():
            steps = loop(args.warmup + args.steps)[args.warmup :]
            times[name] += steps
            print(
                f"repeat {repeat + 1}: {name:<13} median {statistics.median(steps) * 1e3:7.1f} ms",
                flush=True,
            )
    plain = statistics.median(times["plain"])
    print("\n| loop | steps | median s/step | against plain |\n|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {len(samples)} | {median:.4f} | {median / plain:.2f} |")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end {load}")
    print(f"pretrain_step_ratio={statistics.median(times['train']) / plain:.3f}")


if __name__ == "__main__":
    main()
