"""Train indices per client through flwr-datasets partitioners, identical in every process.

The partitioners are fed a ``datasets.Dataset`` that holds only the label and an index
column, so 60 000 labels split in well under a second and every Ray actor derives the same
partitions from the seed, without touching an image.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from adc_flwr.data.splits import DataError

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    alpha: float = 0.5,
    min_partition_size: int = 10,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
    seed: int = 42,
    shared: bool = False,
) -> Sequence[np.ndarray]:
    """Split train indices into ``num_partitions`` disjoint, sorted int64 arrays.

    The flwr-datasets partitioner sees a two-column ``datasets.Dataset`` (label, index),
    first shuffled with ``seed`` (as ``FederatedDataset(shuffle=True)`` does); ``shard``
    then sorts by label (stably), since shards are slices of a label-sorted dataset.
    ``pathological`` uses ``class_assignment_mode='first-deterministic'`` so partition i
    always holds class ``i % num_classes`` and no class is dropped when there are at least
    as many partitions as classes. ``shard`` leaves out the remainder of
    ``len(labels) % (num_partitions * shards_per_client)`` samples; the others cover all.

    Results are cached per process (the labels' bytes are part of the key); callers get
    copies, or with ``shared=True`` the cached arrays themselves, read-only (no copy: what a
    client that looks its partition up on every message needs).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    n = int(labels.shape[0])
    if partitioner not in PARTITIONERS:
        raise DataError(
            f"partitioner={partitioner!r} is unknown; allowed values are {', '.join(PARTITIONERS)}"
        )
    if num_partitions < 1 or num_partitions > n:
        raise DataError(
            f"{num_partitions} partitions (the number of clients: run-config key "
            "'num-partitions', or federation key 'num-supernodes' when it is 0) "
            f"must be in [1, {n}] for {n} training samples"
        )
    key = (
        labels.astype(np.int64).tobytes(),
        num_partitions,
        partitioner,
        float(alpha),
        int(min_partition_size),
        int(classes_per_client),
        int(shards_per_client),
        int(seed),
    )
    cached = _partition_cached(*key)
    return cached if shared else [p.copy() for p in cached]


@functools.lru_cache(maxsize=16)
def _partition_cached(
    label_bytes: bytes,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    min_partition_size: int,
    classes_per_client: int,
    shards_per_client: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    labels = np.frombuffer(label_bytes, dtype=np.int64)
    n = labels.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    num_classes = int(np.unique(labels).size)

    part: Any
    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        if not alpha > 0:
            raise DataError(f"alpha={alpha} must be > 0 for partitioner='dirichlet'")
        if min_partition_size * num_partitions > n:
            raise DataError(
                f"min-partition-size={min_partition_size} × {num_partitions} partitions exceeds "
                f"the {n} training samples; lower `min-partition-size` or use fewer clients"
            )
        part = DirichletPartitioner(
            num_partitions, "label", alpha, min_partition_size=min_partition_size, seed=seed
        )
    elif partitioner == "pathological":
        if not 1 <= classes_per_client <= num_classes:
            raise DataError(
                f"classes-per-client={classes_per_client} must be in [1, {num_classes}] "
                f"(the dataset has {num_classes} classes) for partitioner='pathological'"
            )
        part = PathologicalPartitioner(
            num_partitions,
            "label",
            classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        if shards_per_client < 1 or num_partitions * shards_per_client > n:
            raise DataError(
                f"shards-per-client={shards_per_client} × {num_partitions} partitions must be "
                f"between 1 and the {n} training samples for partitioner='shard'"
            )
        part = ShardPartitioner(
            num_partitions, "label", num_shards_per_partition=shards_per_client, seed=seed
        )

    # Arrow format: the partitioners call np.asarray(dataset[label]); with the default
    # python format datasets 4 turns that into a row-by-row loop (0.5 s for 60 000 labels).
    ds = datasets.Dataset.from_dict({"label": labels[order], "idx": order}).with_format("arrow")
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            # Dirichlet warns on each resampling, pathological on unused classes: both are
            # outcomes we either accept or turn into a DataError below.
            warnings.simplefilter("ignore")
            out = _read_partitions(part, ds, order)
    except ValueError as exc:
        if partitioner == "dirichlet":
            msg = (
                f"partitioner='dirichlet' could not give each of {num_partitions} partitions at "
                f"least min-partition-size={min_partition_size} samples with alpha={alpha} "
                "(10 Dirichlet draws); raise `alpha`, lower `min-partition-size` or use fewer "
                "clients"
            )
        elif partitioner == "pathological":
            msg = (
                f"partitioner='pathological' with classes-per-client={classes_per_client} and "
                f"{num_partitions} partitions is impossible: a class has fewer samples than "
                "partitions that need it; lower `classes-per-client` or use fewer clients"
            )
        else:
            msg = f"partitioner={partitioner!r} failed with {num_partitions} partitions"
        raise DataError(f"{msg} ({exc})") from exc
    for p in out:
        p.setflags(write=False)
    return out


def _read_partitions(part: Any, ds: Any, order: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each partition's original indices, sorted.

    ``load_partition`` costs a ``Dataset.select`` per partition, and datasets fingerprints
    the partitioner's index list with dill (about 0.5 s per 6 000 indices). So once the
    assignment is made (``num_partitions`` triggers it) the row lists are read from the
    partitioner's ``_partition_id_to_indices`` (flwr-datasets 0.6.1; pinned) and mapped
    to original indices. IidPartitioner's blocks are computed by its own rule; any other
    partitioner without that attribute goes through ``load_partition``.
    """
    num = part.num_partitions
    if type(part).__name__ == "IidPartitioner" and part.dataset is ds:
        # load_partition is Dataset.shard(num, i, contiguous=True): row blocks whose sizes
        # differ by at most one, the larger first (np.array_split's rule), without the
        # per-partition select that makes 100 000 partitions take two minutes
        return tuple(np.sort(order[rows]) for rows in np.array_split(np.arange(len(order)), num))
    rows = getattr(part, "_partition_id_to_indices", None)
    if not isinstance(rows, dict) or len(rows) != num:
        return tuple(
            np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num)
        )
    # ShardPartitioner swaps in a label-sorted copy; its rows index that copy.
    row_to_index = order if part.dataset is ds else np.asarray(part.dataset["idx"])
    return tuple(np.sort(row_to_index[np.asarray(rows[i], dtype=np.int64)]) for i in range(num))


def label_counts(
    labels: np.ndarray, partitions: list[np.ndarray], num_classes: int
) -> pd.DataFrame:
    """Samples per class per partition: rows partition id, columns class id, plus 'total'."""
    labels = np.asarray(labels)
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}")
    rows = [
        np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)
        for p in partitions
    ]
    counts = np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)
    df = pd.DataFrame(counts, columns=list(range(num_classes)))
    df.index.name = "partition_id"
    df["total"] = df.sum(axis=1)
    return df


@functools.lru_cache(maxsize=4)
def run_partitions(cfg: RunConfig, num_partitions: int) -> Sequence[np.ndarray]:
    """The run's train-split indices per partition, identical in every process for the same
    config and partition count: read-only arrays, cached per process (a client that looks
    up its partition per message costs a dictionary lookup, even with 100 000 partitions)."""
    options = (
        ("alpha", cfg.alpha),
        ("min_partition_size", cfg.min_partition_size),
        ("classes_per_client", cfg.classes_per_client),
        ("shards_per_client", cfg.shards_per_client),
        ("seed", cfg.seed),
    )
    return _run_partitions(
        cfg.dataset, cfg.data_dir, cfg.classes, num_partitions, cfg.partitioner, options
    )


@functools.lru_cache(maxsize=4)
def _run_partitions(
    dataset: str,
    data_dir: str,
    classes: str,
    num_partitions: int,
    partitioner: str,
    options: tuple[tuple[str, Any], ...],
) -> Sequence[np.ndarray]:
    from adc_flwr.data.sources import load_data

    labels = load_data(dataset, data_dir, classes).train.labels
    return partition_indices(labels, num_partitions, partitioner, **dict(options), shared=True)


def write_partition_counts(
    path: str | os.PathLike[str], cfg: RunConfig, num_partitions: int
) -> None:
    """Write the run's train samples per class per partition (``partitions.csv``: one row
    per partition, a column per class id, ``total``) atomically, so studies of non-IID data
    read the partitions a run trained on rather than rebuilding them."""
    from adc_flwr.data.sources import load_data
    from adc_flwr.run.files import atomic_write_text

    data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
    counts = label_counts(
        data.train.labels, list(run_partitions(cfg, num_partitions)), data.num_classes
    )
    atomic_write_text(path, counts.to_csv())


HELD_OUT_TAG = 0xE7A1  # keeps the held-out draw apart from every other use of the seed


def held_out_split(
    indices: np.ndarray, fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) of one partition: a seeded ``fraction`` of it, at least one sample
    when it has two or more, is kept for federated evaluation and never trained on. Both
    keep the partition's order."""
    if len(indices) < 2:
        return indices, indices[:0]
    count = max(1, round(fraction * len(indices)))
    rng = np.random.default_rng([seed, partition_id, HELD_OUT_TAG])
    held = np.zeros(len(indices), dtype=bool)
    held[rng.choice(len(indices), count, replace=False)] = True
    return indices[~held], indices[held]
