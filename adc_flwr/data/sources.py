"""Where a dataset comes from: the ``dataset`` run-config key, resolved once per process.

``fashion-mnist`` and ``digits`` are small numpy arrays read whole (< 1 s); hub, parquet and
imagefolder sources go through :mod:`adc_flwr.data.hf_datasets` and decode their images lazily.
"""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path

import numpy as np

from adc_flwr.data.classes import select_classes
from adc_flwr.data.hf_datasets import load_hf_style
from adc_flwr.data.splits import DataBundle, DataError, ImageSplit, carve_test, make_bundle
from adc_flwr.data.stats import channel_stats, sample_stats

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


def load_data(dataset: str = "fashion-mnist", data_dir: str = "", classes: str = "") -> DataBundle:
    """Load ``dataset`` once per process (same arguments -> the same object), restricted to
    the ``classes`` run-config key's label subset when it names one
    (:func:`~adc_flwr.data.classes.select_classes`).

    The arrays are read-only because the bundle is shared by everyone in the process; index
    them (``images[idx]`` copies) rather than writing into them. Hub, parquet and
    imagefolder images are decoded when first indexed (:class:`~.images.LazyImages`), and
    their mean/std come from a fixed sample of train (:func:`~.stats.sample_stats`).
    """
    # One cache key however the call is spelled (positional, keyword, default data_dir).
    if classes.strip():
        return _subset_cached(dataset.strip(), data_dir.strip(), classes.strip())
    return _load_data_cached(dataset.strip(), data_dir.strip())


@functools.lru_cache(maxsize=8)
def _subset_cached(dataset: str, data_dir: str, classes: str) -> DataBundle:
    return select_classes(_load_data_cached(dataset, data_dir), classes)


@functools.lru_cache(maxsize=8)
def _load_data_cached(dataset: str, data_dir: str) -> DataBundle:
    if dataset == "fashion-mnist":
        train, test = _load_fashion_mnist(data_dir)
        return make_bundle(train, test, list(FASHION_MNIST_CLASSES), channel_stats(train.images))
    if dataset == "digits":
        train, test, names = _load_digits()
        return make_bundle(train, test, names, channel_stats(train.images))
    prefix, _, rest = dataset.partition(":")
    if prefix not in ("hf", "parquet", "imagefolder") or not rest:
        raise DataError(
            f"dataset={dataset!r} is unknown; allowed values are 'fashion-mnist', 'digits', "
            "'hf:<hub id>', 'parquet:<dir or file>' or 'imagefolder:<dir>'"
        )
    train, test, names = load_hf_style(prefix, rest, data_dir)
    return make_bundle(train, test, names, sample_stats(train.images))


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
        arrays = {
            stem: _read_idx(path, ndim=3 if "images" in stem else 1) for stem, path in files.items()
        }
        splits = []
        for prefix in ("train", "t10k"):
            images, labels = (
                arrays[f"{prefix}-images-idx3-ubyte"],
                arrays[f"{prefix}-labels-idx1-ubyte"],
            )
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"Fashion-MNIST IDX files are damaged: {files[f'{prefix}-images-idx3-ubyte']} "
                    f"holds {images.shape[0]} images but "
                    f"{files[f'{prefix}-labels-idx1-ubyte']} {labels.shape[0]} labels. "
                    "Reinstall dataset-fashion-mnist or fix data-dir"
                )
            splits.append(ImageSplit(images[:, None], labels.astype(np.int64)))
        return splits[0], splits[1]
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


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x00000800 | ndim); :class:`DataError`
    naming the file and what is wrong with it when it is damaged."""

    def damaged(what: str) -> DataError:
        return DataError(
            f"Fashion-MNIST IDX file {path} is damaged: {what}. Reinstall "
            "dataset-fashion-mnist (`apt-get install --reinstall dataset-fashion-mnist`) or "
            "point data-dir at intact files"
        )

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip garbage, a truncated .gz, unreadable
        raise damaged(f"it cannot be read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise damaged(f"its magic number is {got}, not 0000080{ndim} (unsigned bytes, {ndim}-D)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise damaged(f"it ends inside its header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != math.prod(shape):
        raise damaged(
            f"its header promises {shape} = {math.prod(shape)} bytes of data, it holds {data.size}"
        )
    return data.reshape(shape).copy()


# digits -------------------------------------------------------------------------------


def _load_digits() -> tuple[ImageSplit, ImageSplit, list[str]]:
    """scikit-learn's 8×8 digits, 0..16 scaled to 0..255, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = carve_test(labels)
    names = [str(n) for n in bunch.target_names]
    return (
        ImageSplit(images[train_idx], labels[train_idx]),
        ImageSplit(images[test_idx], labels[test_idx]),
        names,
    )
