"""What every source produces: splits, the bundle around them, and the error they raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from adc_flwr.data.images import LazyImages

# Fixed seed for carving a test split (digits, hub/local sets without one): the test set is
# part of the dataset, not of the run, so it must not move with the run seed.
_TEST_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


class DataError(ValueError):
    """Data is missing, unreadable or cannot be partitioned as configured.

    The message names the run-config key to change or the command that gets the data.
    """


@dataclass(frozen=True)
class ImageSplit:
    """One split: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64, both read-only.

    ``images`` is an array for the built-in sources and :class:`LazyImages` for hub, parquet
    and imagefolder ones, which decodes rows when first indexed; ``images[idx]`` with an int
    array gives the same uint8 array either way.
    """

    images: np.ndarray | LazyImages
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DataBundle:
    """A loaded dataset; ``mean``/``std`` are per channel in [0, 1] units, from train.

    Hub, parquet and imagefolder sources take them from a fixed sample of train (see
    :func:`~adc_flwr.data.stats.sample_stats`), the built-in sources from all of it.
    """

    train: ImageSplit
    test: ImageSplit
    num_classes: int
    class_names: list[str]
    num_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def make_bundle(
    train: ImageSplit,
    test: ImageSplit,
    class_names: list[str],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> DataBundle:
    """Freeze the arrays (one bundle is shared by everyone in the process) and describe them.

    Raises :class:`DataError` when a split holds a label outside ``0..len(class_names)-1``
    (a damaged file, or labels the class names do not cover): before training, not in it.
    """
    for name, split in (("train", train), ("test", test)):
        check_labels(split.labels, len(class_names), f"the {name} split")
    for split in (train, test):
        if isinstance(split.images, np.ndarray):
            split.images.setflags(write=False)
        split.labels.setflags(write=False)
    mean, std = stats
    return DataBundle(
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        num_channels=int(train.images.shape[1]),
        image_size=int(train.images.shape[2]),
        mean=mean,
        std=std,
    )


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """:class:`DataError` naming ``where``, the first bad row and value when a label lies
    outside ``[0, num_classes)``, or the split is empty."""
    if labels.size == 0:
        raise DataError(f"{where} holds no samples")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{where} holds {bad.size} label(s) outside 0..{num_classes - 1} (the "
            f"{num_classes} classes), first at row {row}: {int(labels[row])}"
        )


def carve_test(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 80/20 split, stratified when every class has at least two samples."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.shape[0])
    present = np.bincount(labels)[np.unique(labels)] if labels.size else np.zeros(1, np.int64)
    stratify = labels if present.min() >= 2 else None
    try:
        train_idx, test_idx = train_test_split(
            idx, test_size=_TEST_FRACTION, random_state=_TEST_SPLIT_SEED, stratify=stratify
        )
    except ValueError:  # too few samples per class for the stratified test size
        train_idx, test_idx = train_test_split(
            idx, test_size=_TEST_FRACTION, random_state=_TEST_SPLIT_SEED
        )
    return np.sort(train_idx), np.sort(test_idx)
