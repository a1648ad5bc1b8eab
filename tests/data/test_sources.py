"""Data sources, partitioners, model input and batch cursors (adc_flwr/data/)."""

from __future__ import annotations

import gzip
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from adc_flwr import data as D
from adc_flwr.data import BatchCursor, DataError

FMNIST = Path(D.FASHION_MNIST_DIR)
HAVE_FMNIST = (FMNIST / "train-images-idx3-ubyte.gz").is_file() or (
    FMNIST / "train-images-idx3-ubyte"
).is_file()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow cache of the local-file tests out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _labels(n: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int64)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _png(path: Path, value: int, size: tuple[int, int], mode: str) -> None:
    from PIL import Image

    arr = np.full((size[1], size[0], 3), value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)


def _value(label: int) -> int:
    """Pixel value that encodes the label, so image/label alignment can be checked."""
    return 20 * label + 5


def _assert_aligned(split: D.ImageSplit) -> None:
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
    np.testing.assert_array_equal(
        split.images[:, 0, split.images.shape[2] // 2, split.images.shape[3] // 2],
        [_value(int(y)) for y in split.labels],
    )


# ----------------------------------------------------------------------------- sources


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {FMNIST}")
def test_fashion_mnist_loads_and_is_cached() -> None:
    b = D.load_data("fashion-mnist")
    assert b.train.images.shape == (60000, 1, 28, 28)
    assert b.test.images.shape == (10000, 1, 28, 28)
    assert b.train.images.dtype == np.uint8 and b.train.labels.dtype == np.int64
    assert (b.num_classes, b.num_channels, b.image_size) == (10, 1, 28)
    assert b.class_names[0] == "T-shirt/top" and b.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.bincount(b.train.labels), [6000] * 10)
    assert b.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert b.std[0] == pytest.approx(0.3530, abs=1e-3)
    assert not b.train.images.flags.writeable  # shared per process
    assert D.load_data("fashion-mnist") is b
    assert D.load_data(dataset="fashion-mnist", data_dir="") is b


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_with_data_dir(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress
        )
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    b = D.load_data("fashion-mnist", str(tmp_path))
    assert b.train.images.shape == (50, 1, 28, 28) and b.test.images.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(b.test.labels, np.arange(20) % 10)


@pytest.mark.parametrize("sub", ["missing", "empty"])
def test_missing_data_dir_says_how_to_get_data(tmp_path: Path, sub: str) -> None:
    where = tmp_path / sub
    if sub == "empty":
        where.mkdir()
    with pytest.raises(DataError) as err:
        D.load_data("fashion-mnist", str(where))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data-dir" in msg


def test_digits_loads_with_fixed_stratified_split() -> None:
    b = D.load_data("digits")
    assert b.train.images.shape[1:] == (1, 8, 8) and b.image_size == 8
    assert len(b.train) + len(b.test) == 1797
    assert len(b.test) == pytest.approx(0.2 * 1797, abs=1)
    assert b.train.images.max() == 255 and b.num_classes == 10
    train_share = np.bincount(b.train.labels) / len(b.train)
    test_share = np.bincount(b.test.labels) / len(b.test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)  # stratified


def _parquet_split(path: Path, n: int, size: tuple[int, int] = (10, 10)) -> None:
    import datasets
    from PIL import Image

    labels = [i % 3 for i in range(n)]
    images = [Image.fromarray(np.full((size[1], size[0], 3), _value(y), np.uint8)) for y in labels]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
        str(path)
    )


def test_parquet_dir_with_train_and_test(tmp_path: Path) -> None:
    _parquet_split(tmp_path / "pq" / "train.parquet", 30)
    _parquet_split(tmp_path / "pq" / "test.parquet", 9)
    b = D.load_data(f"parquet:{tmp_path / 'pq'}")
    assert b.train.images.shape == (30, 3, 10, 10) and b.test.images.shape == (9, 3, 10, 10)
    assert b.class_names == ["a", "b", "c"] and b.num_channels == 3
    _assert_aligned(b.train)
    _assert_aligned(b.test)


def test_parquet_file_carves_test_and_resolves_against_data_dir(tmp_path: Path) -> None:
    _parquet_split(tmp_path / "only.parquet", 30, size=(12, 16))  # non-square -> 12×12
    b = D.load_data("parquet:only.parquet", str(tmp_path))
    assert b.train.images.shape == (24, 3, 12, 12) and b.test.images.shape == (6, 3, 12, 12)
    np.testing.assert_array_equal(np.bincount(b.test.labels), [2, 2, 2])
    _assert_aligned(b.train)


def test_imagefolder_same_path_mixed_sizes_grayscale(tmp_path: Path) -> None:
    names = ["cat", "dog", "eel"]
    for split, n in (("train", 30), ("test", 9)):
        for i in range(n):
            size = (14, 10) if i % 2 else (10, 10)  # mixed: most common min side is 10
            _png(tmp_path / split / names[i % 3] / f"{i}.png", _value(i % 3), size, "L")
    b = D.load_data(f"imagefolder:{tmp_path}")
    assert b.class_names == names
    assert b.train.images.shape == (30, 1, 10, 10) and b.test.images.shape == (9, 1, 10, 10)
    _assert_aligned(b.train)
    _assert_aligned(b.test)


def test_imagefolder_without_test_split_is_carved_rgb(tmp_path: Path) -> None:
    for i in range(20):
        mode = "RGB" if i == 0 else "L"  # one colour image -> the whole set is RGB
        _png(tmp_path / f"c{i % 2}" / f"{i}.png", _value(i % 2), (8, 8), mode)
    b = D.load_data(f"imagefolder:{tmp_path}")
    assert b.num_channels == 3 and len(b.train) == 16 and len(b.test) == 4
    assert len(b.mean) == 3
    _assert_aligned(b.train)


def test_parquet_array_images_and_string_labels(tmp_path: Path) -> None:
    import datasets

    names = ["x", "y"]
    labels = [names[i % 2] for i in range(20)]
    images = [np.full((6, 6), _value(i % 2), np.uint8) for i in range(20)]
    datasets.Dataset.from_dict({"image": images, "labels": labels}).to_parquet(
        str(tmp_path / "arr.parquet")
    )
    b = D.load_data(f"parquet:{tmp_path / 'arr.parquet'}")
    assert b.class_names == names and b.train.images.shape == (16, 1, 6, 6)
    _assert_aligned(b.train)


@pytest.mark.parametrize(
    ("dataset", "needle"),
    [
        ("mnist", "allowed values"),
        ("parquet:/nonexistent/x.parquet", "data-dir"),
        ("imagefolder:/nonexistent", "does not exist"),
    ],
)
def test_bad_sources_raise_data_error(dataset: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        D.load_data(dataset)


def test_hub_unreachable_fails_fast_with_local_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    def no_network(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Name or service not known")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        D.load_data("hf:uoft-cs/cifar100")
    assert time.perf_counter() - t0 < 2
    msg = str(err.value)
    assert "unreachable" in msg and "parquet:" in msg and "imagefolder:" in msg
    assert "uoft-cs/cifar100" in msg


# ----------------------------------------------------------------------------- partitioners

KW = {"alpha": 0.5, "min_partition_size": 10, "classes_per_client": 2, "shards_per_client": 2}


@pytest.mark.parametrize("name", D.PARTITIONERS)
def test_partitions_disjoint_covering_deterministic(name: str) -> None:
    labels = _labels()
    parts = D.partition_indices(labels, 10, name, seed=1, **KW)
    assert len(parts) == 10 and all(p.dtype == np.int64 and p.size > 0 for p in parts)
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size  # disjoint
    if name == "shard":  # only the remainder that does not fill a shard is left out
        assert labels.size - joined.size < 10 * KW["shards_per_client"]
    else:
        np.testing.assert_array_equal(np.sort(joined), np.arange(labels.size))
    again = D.partition_indices(labels, 10, name, seed=1, **KW)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = D.partition_indices(labels, 10, name, seed=2, **KW)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    parts[0][:] = -1  # callers get copies: the per-process cache stays intact
    assert D.partition_indices(labels, 10, name, seed=1, **KW)[0].min() >= 0


def _mean_max_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = D.label_counts(labels, parts, 10)
    return float((counts.drop(columns="total").max(axis=1) / counts["total"]).mean())


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = _labels(5000)
    iid = _mean_max_share(labels, D.partition_indices(labels, 10, "iid"))
    skew = _mean_max_share(
        labels, D.partition_indices(labels, 10, "dirichlet", alpha=0.1, min_partition_size=5)
    )
    assert iid < 0.2 and skew > iid + 0.3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exact_classes_per_client(k: int) -> None:
    labels = _labels()
    parts = D.partition_indices(labels, 12, "pathological", classes_per_client=k)
    counts = D.label_counts(labels, parts, 10).drop(columns="total")
    assert ((counts > 0).sum(axis=1) == k).all()


def test_label_counts_sums_match() -> None:
    labels = _labels()
    parts = D.partition_indices(labels, 7, "dirichlet", alpha=0.3, min_partition_size=5)
    counts = D.label_counts(labels, parts, 10)
    assert list(counts.columns) == [*range(10), "total"] and counts.index.name == "partition_id"
    assert counts["total"].tolist() == [p.size for p in parts]
    np.testing.assert_array_equal(
        counts.drop(columns="total").sum().to_numpy(), np.bincount(labels)
    )


@pytest.mark.parametrize("name", D.PARTITIONERS)
def test_partitioning_60k_labels(name: str) -> None:
    """Fashion-MNIST's size at the partitioners' defaults: ten disjoint, sorted, non-empty
    partitions (how long it takes: benchmarks/bench_partition.py)."""
    labels = _labels(60000, seed=3)
    parts = D.partition_indices(labels, 10, name, seed=7)
    assert len(parts) == 10 and all(p.size > 0 and np.all(np.diff(p) > 0) for p in parts)
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size and joined.max() < labels.size
    assert joined.size == labels.size or name == "shard"  # shard leaves a remainder out


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"partitioner": "zipf"}, "partitioner"),
        ({"partitioner": "iid", "num_partitions": 5000}, "num-partitions"),
        ({"partitioner": "dirichlet", "min_partition_size": 300}, "min-partition-size"),
        ({"partitioner": "dirichlet", "alpha": 0.01, "min_partition_size": 150}, "alpha"),
        ({"partitioner": "pathological", "classes_per_client": 11}, "classes-per-client"),
        ({"partitioner": "shard", "shards_per_client": 300}, "shards-per-client"),
    ],
)
def test_impossible_settings_name_the_key(kwargs: dict[str, object], needle: str) -> None:
    args: dict = {"num_partitions": 10, **kwargs}
    with pytest.raises(DataError, match=needle):
        D.partition_indices(_labels(), **args)


# ----------------------------------------------------------------------------- model input


def test_to_model_input_normalises_and_resizes() -> None:
    x = np.full((2, 1, 28, 28), 128, np.uint8)
    out = D.to_model_input(x, image_size=32, num_channels=3, mean=(0.5,), std=(0.25,))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25))
    same = D.to_model_input(
        torch.from_numpy(x), image_size=28, num_channels=1, mean=(0.5,), std=(0.25,)
    )
    assert same.shape == (2, 1, 28, 28)
    frozen = x.copy()
    frozen.setflags(write=False)  # like slices of the shared bundle: converts, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.to_model_input(frozen[:1], image_size=28, num_channels=1, mean=(0.5,), std=(0.25,))


def test_to_model_input_grayscale_to_three_channels_and_rgb_stats() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8)).astype(np.uint8)
    out = D.to_model_input(x, image_size=8, num_channels=3, mean=(0.2,), std=(0.3,))
    torch.testing.assert_close(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[:, 0], (torch.from_numpy(x[:, 0]).float() / 255 - 0.2) / 0.3)
    rgb = np.zeros((1, 3, 4, 4), np.uint8)
    out = D.to_model_input(rgb, image_size=4, num_channels=3, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-0.1, -0.2, -0.3]))
    with pytest.raises(ValueError, match="channels"):
        D.to_model_input(rgb, image_size=4, num_channels=1, mean=(0.1,), std=(1,))


# ----------------------------------------------------------------------------- batch cursor


def _take(cursor: BatchCursor, k: int) -> list[np.ndarray]:
    return [cursor.next_batch() for _ in range(k)]


def test_batch_cursor_epoch_coverage_and_short_batches() -> None:
    idx = np.arange(100, 110)
    c = BatchCursor(idx, batch_size=4, seed=0)
    assert c.steps_per_epoch == 3
    epoch = _take(c, 3)
    assert [b.size for b in epoch] == [4, 4, 2]  # short last batch kept as is
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), idx)
    nxt = _take(c, 3)
    np.testing.assert_array_equal(np.sort(np.concatenate(nxt)), idx)
    assert not np.array_equal(np.concatenate(epoch), np.concatenate(nxt))  # reshuffled
    one_left = BatchCursor(np.arange(9), batch_size=4, seed=0)
    assert one_left.steps_per_epoch == 2  # a 1-sample remainder is dropped
    assert [b.size for b in _take(one_left, 4)] == [4, 4, 4, 4]
    assert BatchCursor(np.arange(1), batch_size=4, seed=0).next_batch().size == 1


def test_batch_cursor_deterministic_and_random_access() -> None:
    idx = np.random.default_rng(1).permutation(1000)[:37]
    a, b = BatchCursor(idx, 8, seed=5), BatchCursor(idx, 8, seed=5)
    seq = _take(a, 12)
    assert all(np.array_equal(x, y) for x, y in zip(seq, _take(b, 12), strict=True))
    assert not np.array_equal(
        np.concatenate(seq[:5]), np.concatenate(_take(BatchCursor(idx, 8, seed=6), 5))
    )
    ref = BatchCursor(idx, 8, seed=5)
    _take(ref, 7)
    assert (ref.epoch, ref.position) == (1, 2)
    resumed = BatchCursor(idx, 8, 5, position=7)  # batch 7 of the stream, directly
    assert all(np.array_equal(x, y) for x, y in zip(_take(ref, 9), _take(resumed, 9), strict=True))


@pytest.mark.parametrize(("n", "k"), [(1437, 10), (100, 7), (50, 50), (60000, 9999)])
def test_iid_blocks_are_flwr_datasets_own(n: int, k: int) -> None:
    """IID partitions are computed without a select per partition; they must stay the
    IidPartitioner's own, through its ``load_partition``, index for index."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = _labels(n, seed=4)
    order = np.random.default_rng(11).permutation(n)
    partitioner = IidPartitioner(k)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    parts = D.partition_indices(labels, k, "iid", seed=11)
    for i in sorted({0, 1, k // 2, k - 1}):
        expected = np.sort(np.asarray(partitioner.load_partition(i)["idx"]))
        np.testing.assert_array_equal(parts[i], expected)
