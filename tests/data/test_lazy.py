"""Lazy decoding of hub/parquet/imagefolder images (adc_flwr/data/images.py, stats.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adc_flwr.data import DataError, LazyImages, load_data
from adc_flwr.data import stats as stats_module
from adc_flwr.data.sources import _load_data_cached
from clients.node_cache import client_setup
from tests.support.helpers import tiny_config

NAMES = ["a", "b", "c", "d"]
# Mixed sizes and modes: the most common min(w, h) is 12, so most images are cropped and
# resized, and one RGB image among grayscale ones makes the whole set RGB.
SIZES = [(12, 12), (16, 12), (12, 20), (24, 24), (30, 12)]
SIDE = 12


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the Arrow cache out of ~/.cache (and give subprocesses the same one)."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _images(n: int, seed: int) -> list[object]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(Image.fromarray(pixels).convert("RGB" if i % 7 == 0 else "L"))
    return out


def _features() -> object:
    import datasets

    return datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})


def _write(path: Path, images: list[object]) -> None:
    import datasets

    labels = [i % len(NAMES) for i in range(len(images))]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=_features()).to_parquet(
        str(path)
    )


def _expected(images: list[object]) -> np.ndarray:
    """What decoding must give, made here from the written pixels with PIL directly."""
    from PIL import Image, ImageOps

    out = []
    for im in images:
        img = im.convert("RGB")
        if img.size != (SIDE, SIDE):
            img = ImageOps.fit(img, (SIDE, SIDE), method=Image.Resampling.BILINEAR)
        out.append(np.asarray(img).transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture
def parquet_dir(tmp_path: Path) -> tuple[str, list[object], list[object]]:
    train, test = _images(300, seed=0), _images(60, seed=1)
    _write(tmp_path / "pq" / "train.parquet", train)
    _write(tmp_path / "pq" / "test.parquet", test)
    return f"parquet:{tmp_path / 'pq'}", train, test


def test_lazy_rows_equal_the_eager_decode(parquet_dir: tuple[str, list, list]) -> None:
    dataset, train, test = parquet_dir
    b = load_data(dataset)
    assert isinstance(b.train.images, LazyImages)
    assert b.train.images.shape == (300, 3, SIDE, SIDE) and b.train.images.dtype == np.uint8
    assert (b.num_channels, b.image_size) == (3, SIDE)
    expected = _expected(train)
    idx = np.random.default_rng(5).integers(0, 300, 64)  # unsorted, with repeats
    got = b.train.images[idx]
    assert got.dtype == np.uint8 and got.flags.writeable
    np.testing.assert_array_equal(got, expected[idx])
    np.testing.assert_array_equal(b.train.images[np.arange(300)], expected)  # kept + new rows
    np.testing.assert_array_equal(b.train.images[7], expected[7])
    np.testing.assert_array_equal(b.train.images[10:20:3], expected[10:20:3])
    np.testing.assert_array_equal(b.train.images[:, 1, 5, 6], expected[:, 1, 5, 6])
    assert b.train.images[np.array([], dtype=np.int64)].shape == (0, 3, SIDE, SIDE)
    np.testing.assert_array_equal(b.test.images[np.arange(60)], _expected(test))
    np.testing.assert_array_equal(b.train.labels, np.arange(300) % len(NAMES))


def test_client_decodes_only_its_partition(
    tmp_path: Path, parquet_dir: tuple[str, list, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, _, _ = parquet_dir
    monkeypatch.setattr(stats_module, "_STATS_SAMPLES", 16)
    decoded: list[tuple[LazyImages, np.ndarray]] = []
    original = LazyImages.decode

    def counting(self: LazyImages, rows: np.ndarray) -> np.ndarray:
        decoded.append((self, np.asarray(rows).copy()))
        return original(self, rows)

    monkeypatch.setattr(LazyImages, "decode", counting)
    cfg = tiny_config(tmp_path, dataset=dataset, batch_size=8)
    setup = client_setup(cfg, partition_id=3, num_partitions=10)
    for step in range(setup.steps_per_epoch):  # one epoch: the partition's rows
        setup.skeleton.spec.batch(setup.data.train, setup.batch_indices(step))

    part = setup.indices
    assert 25 <= part.size <= 35  # about a tenth of 300
    train_rows = [rows for store, rows in decoded if store is setup.data.train.images]
    assert all(store is setup.data.train.images for store, _ in decoded)  # no test image
    assert sum(r.size for r in train_rows) <= part.size + 16  # partition + stats sample
    assert train_rows[0].size == 16  # the stats sample, decoded at load
    used = np.unique(np.concatenate(train_rows[1:]))
    assert np.isin(used, part).all() and used.size >= part.size - 1  # (a 1-row rest is dropped)


def _stats_in_subprocess(dataset: str, cache: Path, samples: int) -> list[list[float]]:
    code = (
        "import json, sys\n"
        "import datasets\n"
        "from adc_flwr.data import load_data, stats\n"
        "datasets.config.HF_DATASETS_CACHE = sys.argv[2]\n"
        "stats._STATS_SAMPLES = int(sys.argv[3])\n"
        "b = load_data(sys.argv[1])\n"
        "print(json.dumps([b.mean, b.std]))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code, dataset, str(cache), str(samples)],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stats_come_from_a_fixed_sample(
    parquet_dir: tuple[str, list, list], monkeypatch: pytest.MonkeyPatch, _datasets_cache: Path
) -> None:
    dataset, train, _ = parquet_dir
    monkeypatch.setattr(stats_module, "_STATS_SAMPLES", 40)
    first = load_data(dataset)
    _load_data_cached.cache_clear()
    np.random.seed(123)  # the global RNG must not matter
    second = load_data(dataset)
    assert second is not first
    assert (first.mean, first.std) == (second.mean, second.std)

    pixels = _expected(train).astype(np.float64) / 255.0
    rows = np.sort(np.random.default_rng(stats_module._STATS_SEED).choice(300, 40, replace=False))
    np.testing.assert_allclose(first.mean, pixels[rows].mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(first.std, pixels[rows].std(axis=(0, 2, 3)), rtol=1e-9)
    assert abs(first.mean[0] - pixels.mean(axis=(0, 2, 3))[0]) > 1e-4  # not the full split

    mean, std = _stats_in_subprocess(dataset, _datasets_cache, 40)  # another process
    assert (tuple(mean), tuple(std)) == (first.mean, first.std)


def test_unreadable_images_raise_data_error(tmp_path: Path) -> None:
    import datasets

    blobs = []
    for im in _images(20, seed=2):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    labels = [i % len(NAMES) for i in range(20)]
    truncated = [*blobs[:5], blobs[5][: len(blobs[5]) // 2], *blobs[6:]]
    garbage = [b"not an image", *blobs[1:]]
    for name, column in (("truncated", truncated), ("garbage", garbage)):
        data = {"img": [{"bytes": b, "path": None} for b in column], "label": labels}
        datasets.Dataset.from_dict(data, features=_features()).to_parquet(
            str(tmp_path / f"{name}.parquet")
        )
    # A truncated file has a valid header: it fails when decoded (the stats sample at load,
    # or the first access to its row), as a DataError naming its row all the same.
    with pytest.raises(DataError, match=r"the image in row 5 cannot be read: image file is trunc"):
        b = load_data(f"parquet:{tmp_path / 'truncated.parquet'}")
        b.train.images[np.arange(len(b.train))]
        b.test.images[np.arange(len(b.test))]
    with pytest.raises(DataError, match=r"the image in row 0 of split 0 cannot be read"):
        load_data(f"parquet:{tmp_path / 'garbage.parquet'}")
