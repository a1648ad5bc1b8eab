"""Datasets, partitioners and deterministic mini-batches for the split-learning runs.

Sources (the ``dataset`` run-config key), in :mod:`~adc_flwr.data.sources`:

- ``fashion-mnist`` (default): the IDX files (``.gz`` or uncompressed) under ``data-dir`` or,
  when ``data-dir`` is empty, ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``). Read with numpy: no network, ~0.6 s.
- ``digits``: scikit-learn's 8×8 digits (ships with scikit-learn), split 80/20, stratified,
  with a fixed seed so the test set never moves with the run seed.
- ``hf:<hub id>``, ``parquet:<dir or file>``, ``imagefolder:<dir>``: one code path through
  ``datasets.load_dataset`` (:mod:`~adc_flwr.data.hf_datasets`). Loading reads labels and image
  headers only; images are decoded when first indexed (:mod:`~adc_flwr.data.images`), so a
  client decodes its partition's rows, not both splits.

Every source gives uint8 images (N, C, H, W) with square H == W, int64 labels, and the
per-channel mean/std of the train split (:mod:`~adc_flwr.data.stats`). Missing data raises
:class:`DataError` saying how to get it, never a traceback from deep inside a reader.

Partitioning (:mod:`~adc_flwr.data.partition`) and batching (:mod:`~adc_flwr.data.batches`)
work on train indices only.
"""

from adc_flwr.data.batches import BatchCursor, to_model_input
from adc_flwr.data.images import MAX_IMAGE_SIDE, LazyImages
from adc_flwr.data.partition import (
    PARTITIONERS,
    held_out_split,
    label_counts,
    partition_indices,
    run_partitions,
    write_partition_counts,
)
from adc_flwr.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_data
from adc_flwr.data.splits import DataBundle, DataError, ImageSplit

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MAX_IMAGE_SIDE",
    "PARTITIONERS",
    "BatchCursor",
    "DataBundle",
    "DataError",
    "ImageSplit",
    "LazyImages",
    "held_out_split",
    "label_counts",
    "load_data",
    "partition_indices",
    "run_partitions",
    "to_model_input",
    "write_partition_counts",
]
