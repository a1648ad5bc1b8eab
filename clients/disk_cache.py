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
- an entry is written to a temporary folder (named for its writer's host and PID) and
  renamed into place, so a reader sees a whole entry or none; an entry that fails its checks
  (the indices included: they must be the rows it holds) is removed and rebuilt;
- nodes may share the directory: an entry is removed by renaming it aside first, so a
  reader sees it whole or gone, and one that vanished or was replaced while it was read is
  left to whoever did that; a temporary folder is removed only when its writer is dead (same
  host) or it is older than :data:`STALE_TMP_S`, never while another process fills it;
- at most :data:`MAX_ENTRIES` entries per directory (the least recently used go), each the
  size of one partition's images plus the labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adc_flwr.config import RunConfig
from adc_flwr.data import DataBundle, ImageSplit
from adc_flwr.data.identity import MAX_FILES, bundled_file, file_stats, sha256_file, source_roots

CACHE_ENV = "ADC_NODE_CACHE"
MAX_ENTRIES = 8
FORMAT = 1
STALE_TMP_S = 3600.0  # an unfinished entry this old lost its writer (writing takes seconds)
_META = "meta.json"
_TMP, _TRASH = ".tmp-", ".trash-"  # being written; moved aside to be removed


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


def data_identity(cfg: RunConfig) -> list[list[str | int]] | None:
    """(path, size, mtime in ns) of every file the dataset may be read from (a bundled one:
    its stable name and SHA-256); None when the source's files cannot be named or are more
    than ``MAX_FILES`` (not cached)."""
    if bundled := bundled_file(cfg.dataset):
        name, path = bundled
        digest = sha256_file(path)
        return None if digest is None else [[name, digest]]
    roots = source_roots(cfg.dataset, cfg.data_dir)
    if roots is None:
        return None
    out: list[list[str | int]] = []
    for root in roots:
        root = root.expanduser().resolve()
        out.append([str(root), int(root.exists())])
        stats, capped = file_stats(root, MAX_FILES - len(out))
        if capped:
            return None
        out.extend([str(path), size, mtime] for path, size, mtime in stats)
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
    writer = f"{_TMP}{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=writer, dir=entry.parent))
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
    _check_rows(arrays, len(meta["class_names"]))
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


def _check_rows(arrays: dict[str, np.ndarray], num_classes: int) -> None:
    """The indices are row numbers whose union is exactly the rows held (``ids``, sorted,
    unique: what :class:`PartitionRows` looks rows up in), and the labels are classes."""
    for name in ("ids", "indices", "held_out", "labels"):
        if arrays[name].ndim != 1 or arrays[name].dtype.kind not in "iu":
            raise ValueError(f"{name}.npy is not a list of integers")
    ids, labels = arrays["ids"], arrays["labels"]
    if not np.array_equal(ids, np.unique(np.concatenate([arrays["indices"], arrays["held_out"]]))):
        raise ValueError("indices.npy and held_out.npy are not the rows ids.npy holds")
    if len(ids) and (ids[0] < 0 or ids[-1] >= len(labels)):
        raise ValueError("ids.npy names rows outside the train split")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError("labels.npy holds a class the dataset does not have")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _discard(entry: Path, inode: int | None) -> None:
    """Remove ``entry`` if it is still the folder ``inode`` names: renamed aside in one
    step (a reader sees it whole or gone), then deleted. Gone already, or replaced by another
    process's new entry meanwhile: left alone."""
    if inode is None or _inode(entry) != inode:
        return
    trash = entry.with_name(f"{_TRASH}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(entry, trash)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _writer_gone(folder: Path, now: float) -> bool:
    """A ``.tmp-`` folder whose writer died: its PID is gone (on this host), or it is older
    than :data:`STALE_TMP_S`; a ``.trash-`` folder is always removable."""
    if folder.name.startswith(_TRASH):
        return True
    try:
        age = now - folder.stat().st_mtime
    except OSError:
        return False
    host, _, pid = folder.name.removeprefix(_TMP).rpartition("-")[0].rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            pass
    return age > STALE_TMP_S


def _sweep(root: Path) -> None:
    """Remove unfinished entries whose writers died, and removals that never finished."""
    now = time.time()
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith((_TMP, _TRASH)) and _writer_gone(folder, now):
            shutil.rmtree(folder, ignore_errors=True)


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used entries beyond :data:`MAX_ENTRIES` (those another
    process removes meanwhile are skipped)."""
    entries: list[tuple[int, int, Path]] = []
    for path in root.iterdir():
        if path.name.startswith(".") or path == keep or not path.is_dir():
            continue
        try:
            stat = path.stat()
        except OSError:  # removed by another process since the listing
            continue
        entries.append((stat.st_mtime_ns, stat.st_ino, path))
    entries.sort(reverse=True)
    for _, inode, old in entries[MAX_ENTRIES - 1 :]:
        _discard(old, inode)


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
        inode = _inode(entry)
        try:
            client = _read(entry)
        except (OSError, ValueError, KeyError, TypeError):
            _discard(entry, inode)  # damaged (unless another node replaced it): rebuilt below
        else:
            with contextlib.suppress(OSError):  # evicted since: the data read is whole
                os.utime(entry)  # recently used
            return client
    client = build()
    try:  # a cache that cannot be written (full disk, a racing node) is only slower
        _sweep(root)
        _write(entry, client)
        _evict(root, entry)
        return _read(entry)
    except (OSError, ValueError, KeyError, TypeError):
        return client
