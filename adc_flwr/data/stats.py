"""Per-channel mean/std of a train split, the normalisation every model input gets."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from adc_flwr.data.images import LazyImages

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# The sample behind sample_stats: its own fixed seed, so it never moves with the run seed.
_STATS_SAMPLES = 2048
_STATS_SEED = 0
# Pixel values per decoded block in sample_stats (float64: 32 MB), whatever the image size.
_BLOCK_VALUES = 1 << 22


def channel_stats(images: np.ndarray, chunk: int = 4096) -> Stats:
    """Over the whole split, in chunks so 60 000 images cost ~25 MB, not 400."""
    blocks = (images[start : start + chunk] for start in range(0, images.shape[0], chunk))
    return _accumulate(blocks, images.shape[1])


def sample_stats(images: np.ndarray | LazyImages) -> Stats:
    """Over at most ``_STATS_SAMPLES`` images drawn with a fixed seed (all of a smaller split).

    For hub/parquet/imagefolder sources: every process (server and each Ray actor) computes
    the identical numbers, decoding a couple of thousand images instead of the whole split.
    """
    n = len(images)
    rows = np.sort(
        np.random.default_rng(_STATS_SEED).choice(n, size=min(n, _STATS_SAMPLES), replace=False)
    )
    per_block = max(1, _BLOCK_VALUES // math.prod(images.shape[1:]))
    # LazyImages.decode does not keep the rows: the sample is not this process's partition.
    fetch = images.decode if isinstance(images, LazyImages) else images.__getitem__
    blocks = (fetch(rows[start : start + per_block]) for start in range(0, rows.size, per_block))
    return _accumulate(blocks, images.shape[1])


def _accumulate(blocks: Iterable[np.ndarray], channels: int) -> Stats:
    """Mean/std in [0, 1] units from (B, C, H, W) uint8 blocks."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for images in blocks:
        block = images.astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
        count += images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel must not divide by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
