"""The per-node disk cache (ADC_NODE_CACHE): the same client data as without it, read back
instead of rebuilt, keyed by config, partition and data files, bounded, and never trusted
when damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients import disk_cache, node_cache
from clients.node_cache import client_setup
from tests.support.helpers import tiny_config


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "node-cache"
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(root))
    return root


def _same_client(a: node_cache.ClientSetup, b: node_cache.ClientSetup) -> None:
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.held_out, b.held_out)
    for batch in range(3):
        idx = a.batch_indices(batch)
        np.testing.assert_array_equal(idx, b.batch_indices(batch))
        np.testing.assert_array_equal(a.data.train.images[idx], b.data.train.images[idx])
        np.testing.assert_array_equal(a.data.train.labels[idx], b.data.train.labels[idx])
    held = a.held_out
    np.testing.assert_array_equal(a.data.train.images[held], b.data.train.images[held])
    for field in ("num_classes", "class_names", "num_channels", "image_size", "mean", "std"):
        assert getattr(a.data, field) == getattr(b.data, field)


def test_same_data_as_without_and_read_back_not_rebuilt(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, federated_eval_every=1)
    monkeypatch.delenv(disk_cache.CACHE_ENV)
    plain = client_setup(cfg, 2, 4)
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(cache))
    first = client_setup(cfg, 2, 4)
    assert len(list(cache.iterdir())) == 1
    _same_client(plain, first)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("rebuilt although the disk cache holds it")

    monkeypatch.setattr(node_cache, "_client_data", no_rebuild)
    again = client_setup(cfg, 2, 4)
    _same_client(plain, again)
    assert isinstance(again.data.train.images, disk_cache.PartitionRows)


def test_rows_outside_the_partition_are_refused(tmp_path: Path, cache: Path) -> None:
    setup = client_setup(tiny_config(tmp_path), 0, 4)
    other = np.setdiff1d(np.arange(len(setup.data.train)), setup.indices)[:2]
    with pytest.raises(IndexError, match="outside this node's partition"):
        setup.data.train.images[other]


def test_keyed_by_config_partition_and_data_files(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    key = disk_cache.entry_key(cfg, 0, 4)
    assert key == disk_cache.entry_key(cfg, 0, 4)
    assert key != disk_cache.entry_key(cfg, 1, 4)
    assert key != disk_cache.entry_key(cfg, 0, 5)
    assert key != disk_cache.entry_key(tiny_config(tmp_path, seed=7), 0, 4)

    data = tmp_path / "fmnist"
    data.mkdir()
    (data / "train-images-idx3-ubyte").write_bytes(b"1234")
    fmnist = tiny_config(tmp_path, dataset="fashion-mnist", data_dir=str(data))
    before = disk_cache.entry_key(fmnist, 0, 4)
    (data / "train-images-idx3-ubyte").write_bytes(b"12345")  # another file, another key
    assert disk_cache.entry_key(fmnist, 0, 4) != before


def test_hub_sets_are_not_cached(tmp_path: Path) -> None:
    assert disk_cache.entry_key(tiny_config(tmp_path, dataset="hf:someone/set"), 0, 4) is None


def test_bounded(tmp_path: Path, cache: Path) -> None:
    cfg = tiny_config(tmp_path)
    for pid in range(disk_cache.MAX_ENTRIES + 3):
        client_setup(cfg, pid, disk_cache.MAX_ENTRIES + 3)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == disk_cache.MAX_ENTRIES
    last = disk_cache.entry_key(cfg, disk_cache.MAX_ENTRIES + 2, disk_cache.MAX_ENTRIES + 3)
    assert (cache / str(last)).is_dir()  # the newest stays


@pytest.mark.parametrize("damage", ["object-array", "truncated", "meta"])
def test_a_damaged_entry_is_rebuilt_never_unpickled(
    tmp_path: Path, cache: Path, damage: str
) -> None:
    cfg = tiny_config(tmp_path)
    good = client_setup(cfg, 1, 4)
    entry = cache / str(disk_cache.entry_key(cfg, 1, 4))
    if damage == "object-array":  # a pickle inside a .npy: refused, not loaded
        np.save(entry / "indices.npy", np.array([object()], dtype=object), allow_pickle=True)
    elif damage == "truncated":
        path = entry / "rows.npy"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (entry / "meta.json").write_text("{")
    again = client_setup(cfg, 1, 4)
    _same_client(good, again)
    assert isinstance(again.data.train.images, disk_cache.PartitionRows)


def test_the_local_deployment_names_the_same_variable() -> None:
    from simulations import local_deployment

    assert local_deployment.NODE_CACHE_ENV == disk_cache.CACHE_ENV


def test_a_cache_that_cannot_be_written_only_costs_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADC_NODE_CACHE under a file (or on a full disk): the message still gets its data."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(blocker / "cache"))
    cfg = tiny_config(tmp_path)
    with_cache = client_setup(cfg, 1, 3)
    monkeypatch.delenv(disk_cache.CACHE_ENV)
    _same_client(with_cache, client_setup(cfg, 1, 3))
