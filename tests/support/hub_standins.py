"""Local stand-ins for hub checkpoints and datasets, so tests never need the network.

A tiny ``ViTForImageClassification`` saved with ``save_pretrained`` (with or without an
image processor) and a tiny parquet set of solid-colour RGB images: loaded through the same
``from_pretrained`` / ``datasets.load_dataset`` code as ``hf:`` ids, minus the download.
Imported as ``from tests.support.hub_standins import ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASS_NAMES = ["a", "b", "c"]
# a distinctive processor: nothing like any dataset's statistics, or ImageNet's
PROCESSOR_MEAN = (0.1, 0.2, 0.3)
PROCESSOR_STD = (0.4, 0.5, 0.6)


def save_tiny_vit(
    folder: Path,
    *,
    layers: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    processor: dict[str, Any] | None = None,
) -> Path:
    """A seeded tiny ViT (hidden 32, 2 heads) in ``folder``; with ``processor`` also a
    ``ViTImageProcessor`` built from those keyword arguments. Returns ``folder``."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        num_labels=len(CLASS_NAMES),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder)
    if processor is not None:
        ViTImageProcessorPil(**processor).save_pretrained(folder)
    return folder


def processor_kwargs(side: int = 32) -> dict[str, Any]:
    """A processor that resizes to ``side`` × ``side`` with the distinctive statistics."""
    return {
        "size": {"height": side, "width": side},
        "image_mean": list(PROCESSOR_MEAN),
        "image_std": list(PROCESSOR_STD),
    }


def solid_colours(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) uint8 colours and (n,) labels: class c is brightest in channel c (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    colours = rng.integers(0, 120, (n, 3))
    colours[np.arange(n), labels] += 120
    return colours.astype(np.uint8), labels.astype(np.int64)


def save_parquet_images(
    folder: Path, *, train: int = 60, test: int = 24, side: int = 20, seed: int = 0
) -> str:
    """``train.parquet`` and ``test.parquet`` of solid-colour ``side``-px RGB images of
    three classes; returns the ``dataset`` run-config value (``parquet:<folder>``).

    Solid colours stay exact through any resize, so a model input's pixels can be checked
    against ``(colour / 255 - mean) / std`` without repeating the resize.
    """
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, split_seed in (("train", train, seed), ("test", test, seed + 1)):
        colours, labels = solid_colours(n, split_seed)
        images = [Image.fromarray(np.tile(c, (side, side, 1))) for c in colours]
        datasets.Dataset.from_dict(
            {"img": images, "label": labels.tolist()}, features=features
        ).to_parquet(str(folder / f"{name}.parquet"))
    return f"parquet:{folder}"
