"""What a sweep (and ``scripts/flwr_run.sh``) refuses in seconds, in one ``error:`` line,
instead of a traceback or a wait without end: ``--only`` matching no point, a ``RAY_ADDRESS``
that is malformed or where nothing answers, a point larger than any node of its Ray."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from simulations.parallel import check_resources
from simulations.ray_address import RAY_CLIENT_PORT, RayAddressError, resolve
from simulations.sweep import main
from tests.support.helpers import flwr_run_env

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = """
[base]
dataset = "digits"
batch-size = 16
local-steps = 2

[[grid]]
method = ["none", "adc"]
"""
WAIT_S = 120  # before these checks, each of these commands waited forever


def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "refusals.toml"
    path.write_text(EXPERIMENT)
    return path


def sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The sweep's command line, in this process (before these checks, a wait without end)."""
    code = main([str(experiment(tmp_path)), *args, "--results-root", str(tmp_path / "results")])
    return code, capsys.readouterr().err


def one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


def test_only_matching_no_point_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = sweep(tmp_path, capsys, "--only", "method=pq")
    assert code == 2
    line = one_error_line(err)
    assert "--only method=pq matches none of the 2 points" in line and "none, adc" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("127.0.0.1:1", "cannot reach 127.0.0.1:1 (Connection refused)"),
        ("not an address", "expected HOST:PORT"),
    ],
)
def test_sweep_refuses_a_bad_ray_address_before_ray_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    said: str,
) -> None:
    import ray

    monkeypatch.setenv("RAY_ADDRESS", value)
    started = time.monotonic()
    code, err = sweep(tmp_path, capsys, "--workers", "2")
    assert code == 2, err
    line = one_error_line(err)
    assert f"RAY_ADDRESS={value!r}" in line and said in line
    assert time.monotonic() - started < 60
    assert not list((tmp_path / "results").rglob("sweep.json"))  # nothing was started
    assert not ray.is_initialized()


def test_flwr_run_refuses_a_stale_ray_address(tmp_path: Path) -> None:
    env = flwr_run_env(tmp_path / "out", "stale") | {"RAY_ADDRESS": "bogus.invalid:6379"}
    done = subprocess.run(
        ["bash", "scripts/flwr_run.sh", "dataset='digits' num-server-rounds=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done.stderr)
    assert "RAY_ADDRESS='bogus.invalid:6379': cannot reach bogus.invalid:6379" in line
    assert "SuperLink" not in done.stdout + done.stderr  # nothing of Flower started


def test_sweep_refuses_a_point_larger_than_the_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = 1000 * (os.cpu_count() or 1)
    code, err = sweep(tmp_path, capsys, "--workers", "2", "--point-cpus", str(cpus))
    assert code == 2, err
    line = one_error_line(err)
    assert not ray.is_initialized()
    assert f"--point-cpus {cpus} --point-gpus 0: no node of the Ray cluster" in line
    assert f"{os.cpu_count()} CPUs" in line


def test_point_resources_are_checked_against_each_node() -> None:
    nodes = [(2.0, 0.0), (8.0, 1.0)]
    check_resources(nodes, 8, 1)  # fits the second node
    with pytest.raises(Exception, match="its nodes: 2 CPUs and 0 GPUs, 8 CPUs and 1 GPUs"):
        check_resources(nodes, 4, 2)  # 10 CPUs in all, but no node has 4 with 2 GPUs


@pytest.mark.parametrize(
    ("value", "address", "host", "port"),
    [
        ("", None, "", 0),
        ("local", None, "", 0),
        ("10.0.0.5:6379", "10.0.0.5:6379", "10.0.0.5", 6379),
        ("[::1]:6379", "[::1]:6379", "::1", 6379),
        ("ray://head", "ray://head", "head", RAY_CLIENT_PORT),
        ("ray://head:4321", "ray://head:4321", "head", 4321),
    ],
)
def test_ray_addresses_parse_as_ray_reads_them(
    value: str, address: str | None, host: str, port: int
) -> None:
    assert resolve(value) == (address, host, port)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("not an address", "expected HOST:PORT"),
        ("head", "expected HOST:PORT"),
        ("head:0", "expected HOST:PORT"),
        ("head:port", "Port could not be cast"),
        ("head:70000", "Port out of range"),
        ("http://head:1", "expected HOST:PORT"),
    ],
)
def test_malformed_ray_addresses_are_named(value: str, said: str) -> None:
    with pytest.raises(RayAddressError, match=f"RAY_ADDRESS={value!r}: .*{said}"):
        resolve(value)


def test_auto_is_the_cluster_ray_start_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(RayAddressError, match="no `ray start` on this machine recorded"):
        resolve("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.7:6380\n")
    assert resolve("auto") == ("10.0.0.7:6380", "10.0.0.7", 6380)
