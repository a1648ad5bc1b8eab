"""The ``classes`` run-config key: a label subset, renumbered in the order given
(adc_flwr/config.py ``parse_classes``, adc_flwr/data/classes.py, and everything that loads
the run's data through it: partitions, validation, the launcher, a run)."""

from __future__ import annotations

import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adc_flwr import config
from adc_flwr import data as D
from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.data import DataError, LazyImages, load_data
from adc_flwr.data import stats as stats_module
from adc_flwr.data.partition import partition_indices
from adc_flwr.run.validation import validate_run
from tests.data.test_lazy import NAMES, SIDE, _expected, _images, _write
from tests.support.helpers import flwr_run_env, run_server_app, tiny_config

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path(D.FASHION_MNIST_DIR)
HAVE_FMNIST = (FMNIST / "train-images-idx3-ubyte.gz").is_file() or (
    FMNIST / "train-images-idx3-ubyte"
).is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not in {FMNIST}")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow cache of the parquet tests out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


# ----------------------------------------------------------------------------- parse_classes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("5,6,7,8,9", [5, 6, 7, 8, 9]),
        ("0,2,4-6", [0, 2, 4, 5, 6]),
        ("9,1-3", [9, 1, 2, 3]),  # the order given, not sorted
        ("7", [7]),
        ("4-4", [4]),
        (" 0-2 , 5 ", [0, 1, 2, 5]),  # whitespace around terms
        ("", []),
        ("   ", []),
    ],
)
def test_parse_classes_reads_ranges_and_lists_in_order(spec: str, expected: list[int]) -> None:
    assert config.parse_classes(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a", "'a' is not a class index or a range"),
        ("1-", "'1-' is not a class index or a range"),
        ("-3", "'-3' is not a class index or a range"),
        ("0,,1", "'' is not a class index or a range"),
        ("0,1,", "'' is not a class index or a range"),
        ("1.5", "'1.5' is not a class index"),
        ("3-1", "range '3-1' runs backwards; write '1-3'"),
        ("1,1", "class(es) [1] named more than once"),
        ("0-3,2", "class(es) [2] named more than once"),
    ],
)
def test_parse_classes_refuses_what_it_cannot_read(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        config.parse_classes(spec)
    assert message in str(raised.value)


def test_a_huge_range_is_refused_before_it_is_expanded() -> None:
    """A typo like 0-99999999999 must not build a list of 10^11 ints (minutes, the RAM)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"class index 99999999999 is beyond any dataset"):
            config.parse_classes("0-99999999999")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 1_000_000  # bytes: nothing sized by the range


@pytest.mark.parametrize("spec", ["a", "3-1", "1,1", "0-99999999999"])
def test_run_config_names_the_key(spec: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_run_config({"classes": spec})
    assert "'classes'" in str(raised.value) and repr(spec) in str(raised.value)


def test_run_config_keeps_a_valid_spec() -> None:
    assert RunConfig.from_run_config({"classes": "0,2,4-6"}).classes == "0,2,4-6"
    assert RunConfig.from_run_config({}).classes == ""  # pyproject's default: every class


# ----------------------------------------------------------------------------- select_classes


@needs_fmnist
def test_fashion_mnist_subset_is_renumbered_in_the_order_given() -> None:
    full = load_data("fashion-mnist")
    order = [6, 0, 4, 2]
    sub = load_data("fashion-mnist", "", "6,0,4,2")
    assert sub.num_classes == 4
    assert sub.class_names == [full.class_names[c] for c in order]
    assert sub.class_names[0] == "Shirt"  # class 6 became class 0
    assert (sub.num_channels, sub.image_size) == (full.num_channels, full.image_size)
    assert (sub.mean, sub.std) == (full.mean, full.std)  # the whole dataset's statistics
    for name in ("train", "test"):
        whole, part = getattr(full, name), getattr(sub, name)
        rows = np.flatnonzero(np.isin(whole.labels, order))  # the original order of rows
        np.testing.assert_array_equal(part.labels, [order.index(y) for y in whole.labels[rows]])
        np.testing.assert_array_equal(part.images, whole.images[rows])  # images stay aligned
        np.testing.assert_array_equal(
            np.bincount(part.labels, minlength=4), np.bincount(whole.labels)[order]
        )
        assert not part.images.flags.writeable and not part.labels.flags.writeable
        assert part.labels.dtype == np.int64
    assert load_data("fashion-mnist", "", "6,0,4,2") is sub  # cached per process
    assert load_data("fashion-mnist", classes=" 6,0,4,2 ") is sub  # however it is spelled
    assert load_data("fashion-mnist") is full and full.num_classes == 10  # not mixed up


def test_empty_classes_is_the_whole_dataset() -> None:
    assert load_data("digits", "", "") is load_data("digits")
    assert load_data("digits", "", "  ") is load_data("digits")


@pytest.mark.parametrize("dataset", [pytest.param("fashion-mnist", marks=needs_fmnist), "digits"])
def test_a_class_the_dataset_lacks_is_a_data_error(dataset: str) -> None:
    with pytest.raises(DataError) as raised:
        load_data(dataset, "", "3,10")
    msg = str(raised.value)
    assert "'classes'" in msg and "'3,10'" in msg and "0..9" in msg and "[10]" in msg


# ----------------------------------------------------------------------------- lazy images


@pytest.fixture
def parquet_dataset(tmp_path: Path) -> str:
    """A parquet dataset of 4 classes (labels i % 4) that is decoded lazily."""
    _write(tmp_path / "pq" / "train.parquet", _images(40, seed=0))
    _write(tmp_path / "pq" / "test.parquet", _images(12, seed=1))
    return f"parquet:{tmp_path / 'pq'}"


def test_lazy_subset_decodes_nothing_until_indexed(
    parquet_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_module, "_STATS_SAMPLES", 8)
    decoded: list[tuple[LazyImages, int]] = []
    original = LazyImages.decode

    def counting(self: LazyImages, rows: np.ndarray) -> np.ndarray:
        decoded.append((self, len(rows)))
        return original(self, rows)

    monkeypatch.setattr(LazyImages, "decode", counting)
    full = load_data(parquet_dataset)  # decodes its statistics sample
    decoded.clear()
    sub = load_data(parquet_dataset, "", "3,1")
    assert decoded == []  # selecting reads labels only
    assert isinstance(sub.train.images, LazyImages) and isinstance(sub.test.images, LazyImages)
    assert sub.class_names == [NAMES[3], NAMES[1]] and (sub.mean, sub.std) == (full.mean, full.std)
    assert sub.train.images.shape == (20, 3, SIDE, SIDE) and len(sub.test) == 6

    rows = np.flatnonzero(np.isin(full.train.labels, [3, 1]))  # (20,)
    np.testing.assert_array_equal(sub.train.labels, np.where(full.train.labels[rows] == 3, 0, 1))
    idx = np.array([5, 0, 19, 5])  # unsorted, a repeat
    got = sub.train.images[idx]  # (4, 3, SIDE, SIDE)
    assert [(store, n) for store, n in decoded] == [(sub.train.images, 3)]  # only those rows
    np.testing.assert_array_equal(got, full.train.images[rows[idx]])
    np.testing.assert_array_equal(got, _expected(_images(40, seed=0))[rows[idx]])
    test_rows = np.flatnonzero(np.isin(full.test.labels, [3, 1]))
    np.testing.assert_array_equal(sub.test.images[np.arange(6)], full.test.images[test_rows])


def test_a_split_left_empty_is_a_data_error(tmp_path: Path) -> None:
    """The test split holds classes 0 and 1 only: asking for 3 and 2 leaves it empty."""
    _write(tmp_path / "pq" / "train.parquet", _images(8, seed=0))
    _write(tmp_path / "pq" / "test.parquet", _images(2, seed=1))  # labels 0, 1
    with pytest.raises(DataError, match=r"'classes' = '3,2': the test split holds no sample"):
        load_data(f"parquet:{tmp_path / 'pq'}", "", "3,2")


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological"])
def test_partitions_index_the_subset(tmp_path: Path, partitioner: str) -> None:
    cfg = RunConfig(dataset="digits", classes="0,2,4,6", partitioner=partitioner)
    sub = load_data("digits", "", "0,2,4,6")
    whole = D.run_partitions(cfg.replace(classes=""), 5)  # cached beside it, not instead
    parts = D.run_partitions(cfg, 5)
    assert max(int(p.max()) for p in whole) >= len(sub.train)  # the whole split's indices
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size and joined.max() < len(sub.train)
    expected = partition_indices(
        sub.train.labels,
        5,
        partitioner,
        alpha=cfg.alpha,
        min_partition_size=cfg.min_partition_size,
        classes_per_client=cfg.classes_per_client,
        shards_per_client=cfg.shards_per_client,
        seed=cfg.seed,
    )
    for got, want in zip(parts, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    if partitioner == "dirichlet":
        np.testing.assert_array_equal(np.sort(joined), np.arange(len(sub.train)))
    else:  # each client holds classes_per_client of the 4 classes
        assert all(np.unique(sub.train.labels[p]).size <= cfg.classes_per_client for p in parts)

    D.write_partition_counts(tmp_path / "partitions.csv", cfg, 5)
    table = pd.read_csv(tmp_path / "partitions.csv", index_col="partition_id")
    assert list(table.columns) == ["0", "1", "2", "3", "total"]
    for pid, part in enumerate(parts):
        row = table.loc[pid]
        np.testing.assert_array_equal(
            row[["0", "1", "2", "3"]], np.bincount(sub.train.labels[part], minlength=4)
        )
        assert row["total"] == len(part)


# ----------------------------------------------------------------------------- entry points


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3,10", "run-config key 'classes' = '3,10': the dataset has classes 0..9 (10), not [10]"),
        ("1,1", "run-config key 'classes' = '1,1': class(es) [1] named more than once"),
        ("4-2", "run-config key 'classes' = '4-2': range '4-2' runs backwards"),
    ],
)
def test_validation_refuses_a_bad_subset(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_run({"dataset": "digits", "batch-size": 16, "classes": spec}, num_supernodes=2)
    assert message in str(raised.value)


def test_launcher_refuses_a_missing_class_before_flower_starts(tmp_path: Path) -> None:
    """scripts/flwr_run.sh as users run it: one error line naming the key, exit status 2,
    no Flower process and no run directory (the cost is the launcher's imports, ~10 s)."""
    done = subprocess.run(
        [
            "bash",
            "scripts/flwr_run.sh",
            "dataset='digits' method='none' classes='3,10'",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=ROOT,
        env=flwr_run_env(tmp_path / "out", "bad"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert out.count("error:") == 1 and "Traceback" not in out
    assert "error: run-config key 'classes' = '3,10': the dataset has classes 0..9" in out
    assert "SuperLink" not in out  # nothing of Flower started
    assert not (tmp_path / "out" / "bad").exists()


def test_a_run_on_a_subset_trains_a_head_of_its_size(tmp_path: Path) -> None:
    """The ServerApp as Flower calls it, digits restricted to 3 classes: the run completes,
    its head has 3 outputs and its partitions.csv 3 class columns."""
    cfg = tiny_config(tmp_path, classes="0,3,5")
    summary, _ = run_server_app(cfg, 2)
    assert summary is not None and summary["status"] == "completed"
    run_dir = Path(cfg.run_dir)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert (metrics["kind"] == "step").sum() == cfg.local_steps
    accuracy = metrics.loc[metrics["kind"] == "eval", "test_accuracy"]
    assert len(accuracy) == 1 and 0 <= accuracy.iloc[0] <= 1
    back = torch.load(run_dir / "checkpoint.pt", weights_only=True)["back"]
    assert back["classifier.weight"].shape[0] == 3 and back["classifier.bias"].shape == (3,)
    counts = pd.read_csv(run_dir / "partitions.csv", index_col="partition_id")
    assert list(counts.columns) == ["0", "1", "2", "total"]
    assert counts["total"].sum() == len(load_data("digits", "", "0,3,5").train)


@pytest.mark.parametrize("spec", ["3", "0-0"])
def test_a_single_class_is_refused(spec: str) -> None:
    """One class leaves nothing to classify: refused before a 1-output head is built."""
    with pytest.raises(DataError, match=r"'classes'.*at least 2 classes"):
        load_data("digits", "", spec)


def test_non_ascii_digits_are_not_class_indices() -> None:
    with pytest.raises(ValueError, match="not a class index"):
        config.parse_classes("\u0663,1")
