"""The per-node disk cache (ADC_NODE_CACHE): the same client data as without it, read back
instead of rebuilt, keyed by config, partition and data files, bounded, and never trusted
when damaged."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.mark.parametrize("name", ["indices", "held_out"])
def test_indices_that_are_not_the_rows_held_are_a_miss(
    tmp_path: Path, cache: Path, name: str
) -> None:
    """An entry whose train or held-out indices name a row it does not hold (same shape and
    dtype as its description says) is rebuilt, not handed to the client."""
    cfg = tiny_config(tmp_path, federated_eval_every=1)
    good = client_setup(cfg, 1, 4)
    entry = cache / str(disk_cache.entry_key(cfg, 1, 4))
    array = np.load(entry / f"{name}.npy")
    array[0] = np.setdiff1d(np.arange(len(good.data.train)), np.load(entry / "ids.npy"))[0]
    np.save(entry / f"{name}.npy", array, allow_pickle=False)
    again = client_setup(cfg, 1, 4)
    _same_client(good, again)
    np.testing.assert_array_equal(np.load(entry / f"{name}.npy"), getattr(good, name))


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def test_unfinished_entries_of_dead_writers_are_removed_live_ones_kept(
    tmp_path: Path, cache: Path
) -> None:
    """``.tmp-`` folders are entries being written: removed when their writer's PID is gone
    (this host) or when older than STALE_TMP_S (another host's), never while a live writer
    may still fill them; removals that never finished (``.trash-``) go too."""
    host = socket.gethostname()
    old = time.time() - disk_cache.STALE_TMP_S - 60
    folders = {
        f".tmp-{host}-{_dead_pid()}-abc123": False,  # its writer died
        f".tmp-{host}-{os.getpid()}-live01": True,  # this process is writing it
        ".tmp-elsewhere-1-fresh1": True,  # another host's, recent
        ".tmp-elsewhere-1-stale1": False,  # another host's, old
        ".tmp-0a1b2c3d": False,  # an older version's name, old
        ".trash-123-ffff": False,  # a removal cut short
    }
    cache.mkdir()
    for name in folders:
        (cache / name).mkdir()
        (cache / name / "rows.npy").write_bytes(b"x" * 100)
    for name in (".tmp-elsewhere-1-stale1", ".tmp-0a1b2c3d"):
        os.utime(cache / name, (old, old))
    client_setup(tiny_config(tmp_path), 0, 4)  # a miss: writes an entry
    left = {p.name for p in cache.iterdir() if p.name.startswith(".")}
    assert left == {name for name, kept in folders.items() if kept}


def test_an_entry_replaced_while_it_was_read_is_not_removed(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node evicts the entry this one is reading and a third publishes it again:
    the read fails (a file vanished), but the new entry is whole and stays; only the entry
    that was read could be called damaged."""
    cfg = tiny_config(tmp_path)
    good = client_setup(cfg, 1, 4)
    entry = cache / str(disk_cache.entry_key(cfg, 1, 4))
    copy = tmp_path / "published-again"
    shutil.copytree(entry, copy)
    (copy / "marker").write_text("published by another node")
    real_load = np.load
    raced = []

    def load(path, *args, **kwargs):
        if not raced:  # mid-read: evicted by one node, published again by another
            raced.append(True)
            shutil.rmtree(entry)
            copy.rename(entry)
            raise FileNotFoundError(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(disk_cache.np, "load", load)
    again = client_setup(cfg, 1, 4)
    _same_client(good, again)
    assert raced and (entry / "marker").is_file()  # the new entry stayed


def test_keyed_by_the_files_the_loader_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``parquet:~/x`` with ``data-dir`` set is keyed by the home folder's file (an edit is
    another key); the bundled digits file by its content, not its install path."""
    import shutil

    import sklearn

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "x.parquet").write_bytes(b"rows")
    cfg = tiny_config(tmp_path, dataset="parquet:~/x.parquet", data_dir=str(tmp_path / "d"))
    before = disk_cache.entry_key(cfg, 0, 4)
    (tmp_path / "home" / "x.parquet").write_bytes(b"other rows")
    assert disk_cache.entry_key(cfg, 0, 4) != before

    digits = tiny_config(tmp_path, dataset="digits")
    key = disk_cache.entry_key(digits, 0, 4)
    moved = tmp_path / "venv2" / "sklearn" / "datasets" / "data"
    moved.mkdir(parents=True)
    shutil.copy(Path(sklearn.__file__).parent / "datasets/data/digits.csv.gz", moved)
    monkeypatch.setattr(sklearn, "__file__", str(tmp_path / "venv2" / "sklearn" / "x.py"))
    assert disk_cache.entry_key(digits, 0, 4) == key
