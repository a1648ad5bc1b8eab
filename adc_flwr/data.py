"""Datasets, partitioners and deterministic mini-batches for the split-learning runs.

Sources (the ``dataset`` run-config key):

- ``fashion-mnist`` (default): the IDX files (``.gz`` or uncompressed) under ``data-dir`` or,
  when ``data-dir`` is empty, ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``). Read with numpy: no network, ~0.6 s.
- ``digits``: scikit-learn's 8×8 digits (ships with scikit-learn), split 80/20, stratified,
  with a fixed seed so the test set never moves with the run seed.
- ``hf:<hub id>``, ``parquet:<dir or file>``, ``imagefolder:<dir>``: one code path through
  ``datasets.load_dataset``; only the loader arguments differ. See :func:`_load_hf_style`
  for how the image and label columns are found and how sizes are made uniform.

Every source gives uint8 images (N, C, H, W) with square H == W, int64 labels, and the
per-channel mean/std of the train split. Missing data raises :class:`DataError` saying how
to get it, never a traceback from deep inside a reader.

Partitioning goes through flwr-datasets partitioners, fed a ``datasets.Dataset`` that holds
only the label and an index column, so 60 000 labels split in well under a second and every
Ray actor derives the same partitions from the seed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import io
import math
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MAX_IMAGE_SIDE",
    "PARTITIONERS",
    "BatchCursor",
    "DataBundle",
    "DataError",
    "ImageSplit",
    "label_counts",
    "load_data",
    "partition_indices",
    "to_model_input",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
# Larger images are shrunk to this side at load time: the models here are small ViTs that
# resize anyway, and keeping 500×375 photos would cost gigabytes per Ray actor.
MAX_IMAGE_SIDE = 224
# Fixed seed for carving a test split (digits, hub/local sets without one): the test set is
# part of the dataset, not of the run, so it must not move with the run seed.
_TEST_SPLIT_SEED = 0
_TEST_FRACTION = 0.2
_LABEL_NAMES = ("label", "labels", "fine_label")
_IMAGE_NAMES = ("img", "image")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class DataError(ValueError):
    """Data is missing, unreadable or cannot be partitioned as configured.

    The message names the run-config key to change or the command that gets the data.
    """


@dataclass(frozen=True)
class ImageSplit:
    """One split: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64, both read-only."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DataBundle:
    """A loaded dataset; ``mean``/``std`` are per channel in [0, 1] units, from train."""

    train: ImageSplit
    test: ImageSplit
    num_classes: int
    class_names: list[str]
    num_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_data(dataset: str = "fashion-mnist", data_dir: str = "") -> DataBundle:
    """Load ``dataset`` once per process (same arguments -> the same object).

    The arrays are read-only because the bundle is shared by everyone in the process; index
    them (``images[idx]`` copies) rather than writing into them.
    """
    # One cache key however the call is spelled (positional, keyword, default data_dir).
    return _load_data_cached(dataset.strip(), data_dir.strip())


@functools.lru_cache(maxsize=8)
def _load_data_cached(dataset: str, data_dir: str) -> DataBundle:
    if dataset == "fashion-mnist":
        train, test = _load_fashion_mnist(data_dir)
        names = list(FASHION_MNIST_CLASSES)
    elif dataset == "digits":
        train, test, names = _load_digits()
    else:
        prefix, _, rest = dataset.partition(":")
        if prefix not in ("hf", "parquet", "imagefolder") or not rest:
            raise DataError(
                f"dataset={dataset!r} is unknown; allowed values are 'fashion-mnist', 'digits', "
                "'hf:<hub id>', 'parquet:<dir or file>' or 'imagefolder:<dir>'"
            )
        train, test, names = _load_hf_style(prefix, rest, data_dir)
    return _bundle(train, test, names)


def _bundle(train: ImageSplit, test: ImageSplit, class_names: list[str]) -> DataBundle:
    for split in (train, test):
        split.images.setflags(write=False)
        split.labels.setflags(write=False)
    mean, std = _channel_stats(train.images)
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


def _channel_stats(
    images: np.ndarray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units, in chunks so 60 000 images cost ~25 MB, not 400."""
    c = images.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel must not divide by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# fashion-mnist ------------------------------------------------------------------------


def _fashion_mnist_help(where: str) -> str:
    return (
        f"Fashion-MNIST IDX files not found in {where}. Install them with "
        "`apt-get install dataset-fashion-mnist` (files go to /usr/share/datasets/"
        "fashion-mnist), or point the `data-dir` run-config key at a folder holding "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
        "(e.g. --run-config \"data-dir='/path/to/fashion-mnist'\")."
    )


def _load_fashion_mnist(data_dir: str) -> tuple[ImageSplit, ImageSplit]:
    """Read the four IDX files; ``data-dir`` (or its ``fashion-mnist/`` subfolder) wins."""
    if data_dir:
        root = Path(data_dir).expanduser()
        candidates = [root, root / "fashion-mnist"]
        where = f"data-dir={data_dir!r}"
    else:
        candidates = [Path(FASHION_MNIST_DIR)]
        where = f"{FASHION_MNIST_DIR} (data-dir is empty)"
    for folder in candidates:
        try:
            files = {stem: _find_idx(folder, stem) for stem in _IDX_STEMS}
        except FileNotFoundError:
            continue
        try:
            train = ImageSplit(
                _read_idx(files["train-images-idx3-ubyte"])[:, None],
                _read_idx(files["train-labels-idx1-ubyte"]).astype(np.int64),
            )
            test = ImageSplit(
                _read_idx(files["t10k-images-idx3-ubyte"])[:, None],
                _read_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64),
            )
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{_fashion_mnist_help(where)} Reading {folder} failed: {exc}") from exc
        for split in (train, test):
            if split.images.shape[0] != split.labels.shape[0]:
                raise DataError(
                    f"{_fashion_mnist_help(where)} In {folder} the image and label files "
                    "disagree on the number of samples."
                )
        return train, test
    raise DataError(_fashion_mnist_help(where))


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx(folder: Path, stem: str) -> Path:
    # The original distribution uses dashes; some mirrors use "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(folder / stem)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x00000800 | ndim)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: expected {math.prod(shape)} bytes of data")
    return data.reshape(shape).copy()


# digits -------------------------------------------------------------------------------


def _load_digits() -> tuple[ImageSplit, ImageSplit, list[str]]:
    """scikit-learn's 8×8 digits, 0..16 scaled to 0..255, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _carve_test(labels)
    names = [str(n) for n in bunch.target_names]
    return (
        ImageSplit(images[train_idx], labels[train_idx]),
        ImageSplit(images[test_idx], labels[test_idx]),
        names,
    )


def _carve_test(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


# hf / parquet / imagefolder ----------------------------------------------------------


def _load_hf_style(
    kind: str, target: str, data_dir: str
) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Load through ``datasets.load_dataset``; one path for the hub and local files.

    - image column: the first ``Image`` feature, else a column named ``img``/``image``
      (a numeric array column works too).
    - label column: ``label``/``labels``/``fine_label`` if present (ClassLabel or not), else
      the first ``ClassLabel``. Plain int labels give classes ``0..max``; strings are sorted.
    - colour: grayscale ("L") when every image is single-channel, else RGB (alpha dropped).
    - size: images that all share one square size keep it. Otherwise the side is the most
      common ``min(w, h)`` (the smaller one on ties) and every image is centre-cropped to a
      square and resized to it (bilinear, ``PIL.ImageOps.fit``). Sides above
      ``MAX_IMAGE_SIDE`` are shrunk to it.
    - splits: ``test`` if present, else a fixed stratified 20 % carved from train; train is
      ``train`` if present, else the first split.
    - relative ``parquet:``/``imagefolder:`` paths resolve against ``data-dir`` when set;
      for ``hf:`` a non-empty ``data-dir`` is the Hugging Face cache dir.
    """
    import datasets

    if kind == "hf":
        args: dict[str, Any] = {"path": target}
        if data_dir:
            args["cache_dir"] = data_dir
        _check_hub_reachable(target)
        what = f"hub dataset {target!r}"
    else:
        path = Path(target).expanduser()
        if not path.is_absolute() and data_dir:
            path = Path(data_dir).expanduser() / path
        if not path.exists():
            raise DataError(
                f"dataset='{kind}:{target}': {path} does not exist. Give an existing "
                f"{'parquet file or folder' if kind == 'parquet' else 'image folder'} "
                "(relative paths resolve against the `data-dir` run-config key when it is set)."
            )
        if kind == "parquet":
            if path.is_file():
                args = {"path": "parquet", "data_files": {"train": str(path)}}
            else:
                args = {"path": "parquet", "data_dir": str(path)}
        else:
            if not path.is_dir():
                raise DataError(f"dataset='imagefolder:{target}': {path} is not a folder.")
            args = {"path": "imagefolder", "data_dir": str(path)}
        what = f"{kind} data at {path}"
    try:
        with warnings.catch_warnings(), _quiet_datasets():
            warnings.simplefilter("ignore")
            dsd = datasets.load_dataset(**args)
    except ConnectionError as exc:
        raise DataError(_hub_offline_help(target, str(exc))) from exc
    except Exception as exc:
        hint = (
            "Check the hub id (e.g. 'hf:uoft-cs/cifar100'); without network use a local copy "
            "via 'parquet:<dir>' or 'imagefolder:<dir>'."
            if kind == "hf"
            else "Check that the folder holds the expected files (parquet files, or "
            "<class>/<image> folders, optionally under train/ and test/)."
        )
        raise DataError(f"Could not load {what}: {type(exc).__name__}: {exc}. {hint}") from exc
    if not isinstance(dsd, datasets.DatasetDict) or len(dsd) == 0:
        raise DataError(f"{what} gave no splits.")
    with _quiet_datasets():
        return _from_dataset_dict(dsd, what)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No datasets progress bars while loading: every Ray actor would print its own."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _hub_offline_help(hub_id: str, detail: str) -> str:
    import datasets

    cache = (
        "HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it, so"
        if datasets.config.HF_HUB_OFFLINE
        else "If it is already in the local Hugging Face cache, set HF_HUB_OFFLINE=1;"
    )
    return (
        f"The Hugging Face Hub is unreachable, so dataset='hf:{hub_id}' cannot be downloaded "
        f"({detail}). {cache} otherwise copy the data here and use "
        "dataset='parquet:<dir or file>' or 'imagefolder:<dir>' (local files go through "
        "the same loader, offline)."
    )


def _check_hub_reachable(hub_id: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's ~25 s of retries, when there is no network.

    Skipped in offline mode (the cache is used) and behind a proxy (a direct probe would lie).
    """
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise DataError(_hub_offline_help(hub_id, f"{host}:{port}: {exc}")) from exc


def _pick_columns(features: Any) -> tuple[str, str]:
    import datasets

    image_col = next(
        (n for n, f in features.items() if isinstance(f, datasets.Image)),
        next((n for n in _IMAGE_NAMES if n in features), None),
    )
    label_col = next(
        (n for n in _LABEL_NAMES if n in features),
        next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None),
    )
    if image_col is None or label_col is None:
        raise DataError(
            f"Cannot find the {'image' if image_col is None else 'label'} column among "
            f"{list(features)}: expected an Image feature or a column named img/image, and a "
            "ClassLabel or a column named label/labels/fine_label."
        )
    return image_col, label_col


def _from_dataset_dict(dsd: Any, what: str) -> tuple[ImageSplit, ImageSplit, list[str]]:
    import datasets

    train_name = "train" if "train" in dsd else next(iter(dsd))
    train_ds = dsd[train_name]
    test_ds = dsd["test"] if "test" in dsd and train_name != "test" else None
    image_col, label_col = _pick_columns(train_ds.features)
    label_feature = train_ds.features[label_col]

    parts = [train_ds] if test_ds is None else [train_ds, test_ds]
    raw_labels = [_column(p, label_col) for p in parts]
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        encoded = [np.asarray(r, dtype=np.int64) for r in raw_labels]
    else:
        values = [v for r in raw_labels for v in r]
        if all(isinstance(v, (int, np.integer)) for v in values):
            encoded = [np.asarray(r, dtype=np.int64) for r in raw_labels]
            names = [str(i) for i in range(int(max(values, default=-1)) + 1)]
        else:
            names = sorted({str(v) for v in values})
            lookup = {n: i for i, n in enumerate(names)}
            encoded = [np.asarray([lookup[str(v)] for v in r], dtype=np.int64) for r in raw_labels]
    if any(int(e.min(initial=0)) < 0 for e in encoded):
        raise DataError(f"{what}: column {label_col!r} holds negative labels (unlabelled rows?).")

    images = _decode_images(parts, image_col, what)
    if test_ds is None:
        train_idx, test_idx = _carve_test(encoded[0])
        return (
            ImageSplit(images[0][train_idx], encoded[0][train_idx]),
            ImageSplit(images[0][test_idx], encoded[0][test_idx]),
            names,
        )
    return ImageSplit(images[0], encoded[0]), ImageSplit(images[1], encoded[1]), names


def _column(ds: Any, name: str) -> list[Any]:
    """A whole column as a list in one batch read (``ds[name]`` iterates row by row)."""
    return ds.select_columns([name])[:][name]


def _decode_images(parts: Sequence[Any], column: str, what: str) -> list[np.ndarray]:
    """Decode every split with one colour mode and one square size (see _load_hf_style)."""
    import datasets

    if not isinstance(parts[0].features[column], datasets.Image):
        return [_numeric_images(np.asarray(p.with_format("numpy")[:][column]), what) for p in parts]
    raw = [_column(p.cast_column(column, datasets.Image(decode=False)), column) for p in parts]
    if not any(raw):
        raise DataError(f"{what} holds no images.")
    try:
        out = _decode_same_size(raw)
        return out if out is not None else _decode_mixed_sizes(raw)
    except (OSError, ValueError) as exc:  # PIL: truncated or unknown files
        raise DataError(f"{what}: an image cannot be read: {exc}") from exc


def _open_image(item: dict[str, Any]) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def _decode_same_size(raw: list[list[dict[str, Any]]]) -> list[np.ndarray] | None:
    """The common case in one decoding pass: all images share one square size.

    Every image is stored as RGB (grayscale ones replicated, exactly what PIL's L -> RGB
    does); if none was colour, channel 0 is the L image. Returns None at the first image of
    another size (or a side above MAX_IMAGE_SIDE): the two-pass path takes over.
    """
    first = next(items[0] for items in raw if items)
    with _open_image(first) as im:
        size = im.size
    if size[0] != size[1] or size[0] > MAX_IMAGE_SIDE:
        return None
    side = size[0]
    out, colour = [], False
    for items in raw:
        arr = np.empty((len(items), side, side, 3), dtype=np.uint8)
        for i, item in enumerate(items):
            with _open_image(item) as im:
                if im.size != size:
                    return None
                if im.mode in _GRAY_MODES:
                    arr[i] = np.asarray(im.convert("L"))[:, :, None]
                else:
                    arr[i] = np.asarray(im.convert("RGB"))
                    colour = True
        out.append(arr)
    keep = slice(0, 3) if colour else slice(0, 1)
    return [np.ascontiguousarray(a[..., keep].transpose(0, 3, 1, 2)) for a in out]


def _decode_mixed_sizes(raw: list[list[dict[str, Any]]]) -> list[np.ndarray]:
    """Two passes: headers (PIL opens lazily) choose mode and side, then decode and fit."""
    from PIL import Image, ImageOps

    modes: set[str] = set()
    sides: collections.Counter[int] = collections.Counter()
    for items in raw:
        for item in items:
            with _open_image(item) as im:
                modes.add(im.mode)
                sides[min(im.size)] += 1
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    channels = 1 if mode == "L" else 3
    best = max(sides.values())
    side = min(min(s for s, n in sides.items() if n == best), MAX_IMAGE_SIDE)
    out = []
    for items in raw:
        arr = np.empty((len(items), side, side, channels), dtype=np.uint8)
        for i, item in enumerate(items):
            with _open_image(item) as im:
                img = im.convert(mode)
                if img.size != (side, side):
                    img = ImageOps.fit(img, (side, side), method=Image.Resampling.BILINEAR)
                arr[i] = np.asarray(img).reshape(side, side, channels)
        out.append(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return out


def _numeric_images(arr: np.ndarray, what: str) -> np.ndarray:
    """Array columns: (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or floats in [0, 1]."""
    if arr.dtype.kind == "f":
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.rint(np.clip(arr * scale, 0.0, 255.0))
    arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[2] != arr.shape[3]:
        raise DataError(
            f"{what}: array images of shape {arr.shape[1:]} are not square (N, C, H, W) or "
            "(N, H, W[, C]); store them as an Image feature to get resizing."
        )
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------


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
) -> list[np.ndarray]:
    """Split train indices into ``num_partitions`` disjoint, sorted int64 arrays.

    The flwr-datasets partitioner sees a two-column ``datasets.Dataset`` (label, index),
    first shuffled with ``seed`` (as ``FederatedDataset(shuffle=True)`` does); ``shard``
    then sorts by label (stably), since shards are slices of a label-sorted dataset.
    ``pathological`` uses ``class_assignment_mode='first-deterministic'`` so partition i
    always holds class ``i % num_classes`` and no class is dropped when there are at least
    as many partitions as classes. ``shard`` leaves out the remainder of
    ``len(labels) % (num_partitions * shards_per_client)`` samples; the others cover all.

    Results are cached per process (the labels' bytes are part of the key).
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
            f"num_partitions={num_partitions} (the number of clients, `options.num-supernodes`) "
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
    return [p.copy() for p in _partition_cached(*key)]


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
    to original indices; without that attribute (IidPartitioner) ``load_partition`` is used.
    """
    num = part.num_partitions
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


# --------------------------------------------------------------------------------------
# Model input and mini-batches
# --------------------------------------------------------------------------------------


def to_model_input(
    images: np.ndarray | torch.Tensor,
    *,
    image_size: int,
    num_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, num_channels, image_size, image_size), normalised.

    Resizes with bilinear interpolation (antialiased when shrinking) when sizes differ and
    repeats a grayscale channel when the model wants 3. Floating input is taken as already
    in [0, 1]. ``mean``/``std`` have one entry per source channel or a single entry.
    """
    if isinstance(images, np.ndarray):
        # astype copies, so read-only slices of the shared bundle convert without a warning.
        scale = 1.0 if images.dtype.kind == "f" else 255.0
        x = torch.from_numpy(images.astype(np.float32)) / scale
    else:
        x = images.to(torch.float32) if images.is_floating_point() else images.float() / 255.0
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c != num_channels and not (c == 1 and num_channels == 3):
        raise ValueError(
            f"images have {c} channels but the model wants {num_channels}; only 1 -> 3 is "
            "converted (build the model with the bundle's num_channels)"
        )
    if x.shape[-2:] != (image_size, image_size):
        shrink = x.shape[-1] > image_size or x.shape[-2] > image_size
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink
        )
    m = torch.as_tensor(tuple(mean), dtype=torch.float32)
    s = torch.as_tensor(tuple(std), dtype=torch.float32)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(f"mean/std need 1 or {c} entries, got {m.numel()} and {s.numel()}")
    x = (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    if c != num_channels:
        x = x.expand(-1, num_channels, -1, -1).contiguous()
    return x


class BatchCursor:
    """Deterministic mini-batches over one partition's indices, resumable from ``state()``.

    Each epoch uses the permutation drawn from ``(seed, epoch)``, so the sequence depends on
    nothing but these numbers. Every index appears once per epoch; the last short batch is
    returned as is, except that a 1-sample remainder is dropped (ADC clustering and
    batch statistics need 2) unless it is the only batch of the epoch.
    """

    def __init__(
        self, indices: np.ndarray, batch_size: int, seed: int, epoch: int = 0, position: int = 0
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or self.indices.size == 0:
            raise ValueError("BatchCursor needs a non-empty 1-D array of indices")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        n = self.indices.size
        full, rest = divmod(n, self.batch_size)
        self.steps_per_epoch = full + (1 if rest >= 2 or (rest == 1 and full == 0) else 0)
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch={epoch} and position={position} must be >= 0")
        epoch += position // self.steps_per_epoch
        self.epoch = int(epoch)
        self.position = int(position % self.steps_per_epoch)
        self._order_epoch = -1
        self._order = self.indices

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = self.indices[rng.permutation(self.indices.size)]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """The next batch of indices (a fresh array); rolls over into the next epoch."""
        order = self._epoch_order()
        start = self.position * self.batch_size
        batch = order[start : start + self.batch_size].copy()
        self.position += 1
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch

    def state(self) -> dict[str, int]:
        """Where the cursor stands: small, JSON-friendly, enough to resume exactly."""
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state(
        cls, indices: np.ndarray, batch_size: int, seed: int, state: dict[str, int]
    ) -> BatchCursor:
        """Rebuild a cursor that continues exactly where ``state()`` was taken."""
        return cls(
            indices, batch_size, seed, epoch=int(state["epoch"]), position=int(state["position"])
        )
