"""Which files a dataset is read from, resolved exactly as the loaders resolve them, and
their identity: path, size and modification time.

Shared by the node's disk cache (:mod:`clients.disk_cache`, its key), a run's
``inputs.json`` (:mod:`adc_flwr.run.inputs`) and the input root
(:func:`adc_flwr.run.input_root.local_inputs`). Datasets are identified by ``stat`` only,
never hashed: reading the whole of Fashion-MNIST (or a folder of images) at every start would
cost more than it protects. The exception is scikit-learn's bundled ``digits`` file (~60 kB),
identified by its content under a stable name, so that a rebuilt or moved environment is the
same input. A listing stops after :data:`MAX_FILES` files, in sorted order, and says that it
did (see docs/run-directory.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from adc_flwr.data.sources import FASHION_MNIST_DIR

MAX_FILES = 10_000  # files listed per dataset; past it a listing says it was capped
DIGITS = "scikit-learn:datasets/data/digits.csv.gz"  # the bundled file's stable name


def dataset_path(dataset: str, data_dir: str) -> Path | None:
    """The local file or folder a ``parquet:``/``imagefolder:`` dataset, or an ``hf:`` one
    that names an existing local folder, is read from, as the loader resolves it
    (:func:`adc_flwr.data.hf_datasets.load_hf_style`): ``~`` expanded and a relative path
    under ``data-dir`` when it is set; an ``hf:`` target as ``datasets.load_dataset`` sees it
    (a folder, relative to the working directory, no ``~``). None for any other dataset."""
    prefix, _, target = dataset.strip().partition(":")
    target, data_dir = target.strip(), data_dir.strip()
    if not target:
        return None
    if prefix in ("parquet", "imagefolder"):
        path = Path(target).expanduser()
        if not path.is_absolute() and data_dir:
            path = Path(data_dir).expanduser() / path
        return path
    if prefix == "hf" and Path(target).is_dir():
        return Path(target)
    return None


def bundled_file(dataset: str) -> tuple[str, Path] | None:
    """``(stable name, path)`` of a dataset shipped inside an installed package (``digits``:
    scikit-learn's), identified by content under the name, never by the install path."""
    if dataset.strip() != "digits":
        return None
    import sklearn

    return DIGITS, Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"


def source_roots(dataset: str, data_dir: str) -> list[Path] | None:
    """The files or folders ``dataset`` is read from, ``~`` expanded; None when they cannot
    be listed: a hub dataset, or a bundled one (:func:`bundled_file`)."""
    if dataset.strip() == "fashion-mnist":
        return [Path(data_dir.strip() or FASHION_MNIST_DIR).expanduser()]
    path = dataset_path(dataset, data_dir)
    return None if path is None else [path]


def sha256_file(path: Path) -> str | None:
    """The content's SHA-256, streamed; None for a missing or unreadable file (or not a
    regular file: a FIFO would block)."""
    try:
        if not path.is_file():
            return None
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def walk_files(root: Path) -> Iterator[Path]:
    """``root`` itself when it is a file, else every file under it, folders and names in
    sorted order (the same order on every machine)."""
    if root.is_file():
        yield root
    elif root.is_dir():
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                yield Path(folder) / name


def file_stats(root: Path, limit: int) -> tuple[list[tuple[Path, int, int]], bool]:
    """``(path, size, mtime in ns)`` of the first ``limit`` files of :func:`walk_files`, and
    whether there were more (the listing was capped). A file that cannot be stat'ed (a
    dangling link) is listed with size and mtime -1."""
    out: list[tuple[Path, int, int]] = []
    for path in walk_files(root):
        if len(out) >= limit:
            return out, True
        try:
            stat = path.stat()
        except OSError:
            out.append((path, -1, -1))
            continue
        out.append((path, stat.st_size, stat.st_mtime_ns))
    return out, False
