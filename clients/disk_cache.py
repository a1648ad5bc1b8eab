"""A node's data on its own disk, for runtimes that start a process per message.

Flower 1.41's Deployment Runtime starts a new ``flwr-clientapp`` process for every message,
so the per-process caches of :mod:`clients.node_cache` start empty each time, and decoding
the dataset and partitioning it again cost seconds a message. With ``ADC_NODE_CACHE`` set to
a directory, the first message a node handles for a run config writes what its client reads
(its partition's image rows, the labels, its train and held-out indices, the dataset's
description); every later message reads that back. Unset, nothing is written.

Safe by construction:

- the key is a SHA-256 of everything that decides the content: the whole run config, the
  partition id and count, and the identity (path, size, mtime) of every dataset file it was
  read from; sources whose files cannot be named (``hf:`` hub sets) are not cached;
- the content is data: ``.npy`` arrays read with ``allow_pickle=False`` and a JSON of
  numbers and strings, checked against each other on read; nothing is unpickled;
- an entry is written to a temporary folder and renamed into place, so a reader sees a
  whole entry or none; an entry that fails its checks is removed and rebuilt;
- at most :data:`MAX_ENTRIES` entries per directory (the least recently used go), each the
  size of one partition's images plus the labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adc_flwr.config import RunConfig
from adc_flwr.data import DataBundle, ImageSplit
from adc_flwr.data.sources import FASHION_MNIST_DIR

CACHE_ENV = "ADC_NODE_CACHE"
MAX_ENTRIES = 8
MAX_FILES = 10_000  # a data folder with more files is not fingerprinted (nor cached)
FORMAT = 1
_META = "meta.json"


@dataclass(frozen=True)
class ClientData:
    """What a client reads: the dataset (train images only its partition's rows) and its
    train and held-out indices into the train split."""

    data: DataBundle
    indices: np.ndarray
    held_out: np.ndarray


class PartitionRows:
    """A train split's images holding only some rows: ``images[idx]`` as for the whole
    array, for indices among ``ids``; any other row is an error, not another image."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray, total: int) -> None:
        self.ids, self.rows = ids, rows
        self.shape = (total, *rows.shape[1:])
        self.dtype = rows.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        pos = np.searchsorted(self.ids, idx).clip(0, max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or not np.array_equal(self.ids[pos], idx):
            raise IndexError("rows outside this node's partition were asked for")
        return self.rows[pos]


def cache_dir() -> Path | None:
    """The directory ``ADC_NODE_CACHE`` names, or None (no disk cache)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value) if value else None


def _source_roots(cfg: RunConfig) -> list[Path] | None:
    """Where the dataset's files live, or None when they cannot be named."""
    prefix, _, rest = cfg.dataset.strip().partition(":")
    roots = [Path(cfg.data_dir)] if cfg.data_dir.strip() else []
    if cfg.dataset.strip() == "fashion-mnist":
        return roots or [Path(FASHION_MNIST_DIR)]
    if cfg.dataset.strip() == "digits":
        import sklearn

        return [Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"]
    if prefix in ("parquet", "imagefolder") and rest:
        path = Path(rest)
        return [*roots, path if path.is_absolute() else Path(cfg.data_dir) / path]
    return None


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
    elif root.is_dir():
        for folder, _, names in os.walk(root):
            for name in sorted(names):
                yield Path(folder) / name


def data_identity(cfg: RunConfig) -> list[list[str | int]] | None:
    """(path, size, mtime in ns) of every file the dataset may be read from; None when the
    source's files cannot be named or are too many."""
    roots = _source_roots(cfg)
    if roots is None:
        return None
    out: list[list[str | int]] = []
    for root in roots:
        root = root.expanduser().resolve()
        out.append([str(root), int(root.exists())])
        for path in _files(root):
            stat = path.stat()
            out.append([str(path), stat.st_size, stat.st_mtime_ns])
            if len(out) > MAX_FILES:
                return None
    return out


def entry_key(cfg: RunConfig, partition_id: int, num_partitions: int) -> str | None:
    """The entry's name: a hash of the run config, the partition and the data's identity."""
    identity = data_identity(cfg)
    if identity is None:
        return None
    what = [FORMAT, sorted(cfg.to_run_config().items()), partition_id, num_partitions, identity]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:32]


def _write(entry: Path, client: ClientData) -> None:
    data, train = client.data, client.data.train
    ids = np.unique(np.concatenate([client.indices, client.held_out]))
    arrays = {
        "ids": ids,
        "rows": np.ascontiguousarray(train.images[ids]),
        "labels": np.asarray(train.labels),
        "indices": client.indices,
        "held_out": client.held_out,
    }
    meta = {
        "format": FORMAT,
        "total": len(train),
        "class_names": list(data.class_names),
        "num_channels": data.num_channels,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: v.dtype.str for k, v in arrays.items()},
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / _META).write_text(json.dumps(meta))
        os.replace(tmp, entry)  # whole or not at all; a racing writer's entry is as good
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise


def _read(entry: Path) -> ClientData:
    """An entry back, checked; ValueError (or OSError) when it is not whole and consistent."""
    meta = json.loads((entry / _META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError("another format")
    arrays = {}
    for name, shape in meta["shapes"].items():
        # read whole (not memory-mapped: a file truncated under a map would kill the process)
        array = np.load(entry / f"{name}.npy", allow_pickle=False)
        if list(array.shape) != shape or array.dtype.str != meta["dtypes"][name]:
            raise ValueError(f"{name}.npy does not match its description")
        arrays[name] = array
    images = PartitionRows(arrays["ids"], arrays["rows"], int(meta["total"]))
    labels = arrays["labels"]
    if len(labels) != meta["total"] or len(arrays["ids"]) != len(arrays["rows"]):
        raise ValueError("inconsistent sizes")
    empty = ImageSplit(np.zeros((0, *arrays["rows"].shape[1:]), np.uint8), labels[:0])
    data = DataBundle(
        train=ImageSplit(images, labels),  # type: ignore[arg-type]  # indexed like an array
        test=empty,  # clients never read the test split
        num_classes=len(meta["class_names"]),
        class_names=list(meta["class_names"]),
        num_channels=int(meta["num_channels"]),
        image_size=int(meta["image_size"]),
        mean=tuple(float(v) for v in meta["mean"]),
        std=tuple(float(v) for v in meta["std"]),
    )
    return ClientData(data, arrays["indices"], arrays["held_out"])


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used entries beyond :data:`MAX_ENTRIES`."""
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in [p for p in entries if p != keep][MAX_ENTRIES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def cached_client_data(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    build: Callable[[], ClientData],
) -> ClientData:
    """``build()``'s result, from this node's disk cache when ``ADC_NODE_CACHE`` is set and
    holds it (else built, and written there)."""
    root = cache_dir()
    key = entry_key(cfg, partition_id, num_partitions) if root is not None else None
    if root is None or key is None:
        return build()
    entry = root / key
    if entry.is_dir():
        try:
            client = _read(entry)
            os.utime(entry)  # recently used
            return client
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuilt below
    client = build()
    try:  # a cache that cannot be written (full disk, a racing node) is only slower
        _write(entry, client)
        _evict(root, entry)
        return _read(entry)
    except (OSError, ValueError, KeyError, TypeError):
        return client
