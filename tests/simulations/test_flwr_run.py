"""End to end through `flwr run .` on Ray (the README's run path), on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import psutil
import pytest

from adc_flwr.run.summary import DROP_REASONS
from tests.support.helpers import flwr_run_env

ROOT = Path(__file__).resolve().parents[2]


def flwr_run(
    tmp_path: Path,
    run_name: str,
    run_config: str,
    federation: str = "num-supernodes=2 client-resources-num-cpus=1",
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/flwr_run.sh", run_config, federation],
        cwd=ROOT,
        env=flwr_run_env(tmp_path / "out", run_name),
        capture_output=True,
        text=True,
        timeout=600,
    )


def flower_processes() -> list[str]:
    """Command lines of Flower / Ray processes still running on this machine."""
    names = ("flower-superlink", "flwr-simulation", "raylet", "gcs_server", "ray::")
    return [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
        if any(n in " ".join(p.info["cmdline"] or []) for n in names)
    ]


def test_flwr_run_trains_sampled_partitions_writes_summary_and_stops(tmp_path: Path) -> None:
    """20 SuperNodes under Ray's random node ids, fraction-train 0.25: 5 clients train in
    each round, none lost to a cursor indexed by partition id; nothing is left running."""
    config = (
        "dataset='digits' num-server-rounds=2 local-steps=3 batch-size=16 eval-samples=100 "
        "method='adc' compression=0.25 fraction-train=0.25"
    )
    done = flwr_run(tmp_path, "ok", config, "num-supernodes=20 client-resources-num-cpus=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round   2/2" in done.stdout and "clients 5/5" in done.stdout
    run_dir = tmp_path / "out" / "ok"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert [(r["sampled"], r["clients"]) for r in summary["history"]] == [(5, 5), (5, 5)]
    assert summary["drops"] == dict.fromkeys(DROP_REASONS, 0)
    assert 0 < summary["compression_ratio"] < 0.4
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert (metrics["kind"] == "step").sum() == 2 * 3
    assert not flower_processes()


@pytest.mark.slow  # a run on Ray: in .ci/run; its verdict in process: test_cleanup.py
def test_flwr_run_failure_exits_nonzero(tmp_path: Path) -> None:
    """flwr run itself exits 0 when the ServerApp raises; our script must not."""
    done = flwr_run(tmp_path, "bad", "dataset='digits' method='none' lr=1e8 local-steps=20")
    assert done.returncode == 1
    assert "run bad did not complete (status failed)" in done.stderr
    assert "diverged" in done.stderr
    assert not flower_processes()


@pytest.mark.slow  # a minute on Ray: in .ci/run, out of the default suite
def test_flwr_run_vanilla_trains_every_client(tmp_path: Path) -> None:
    """Vanilla SL over 3 SuperNodes: each client takes its turn, none is dropped."""
    config = (
        "dataset='digits' batch-size=16 eval-samples=100 method='none' num-server-rounds=1 "
        "local-steps=2 sl-mode='vanilla'"
    )
    done = flwr_run(tmp_path, "vanilla", config, "num-supernodes=3 client-resources-num-cpus=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "vanilla" / "summary.json").read_text())
    (row,) = summary["history"]
    assert (row["sampled"], row["clients"]) == (3, 3)
    assert summary["drops"] == dict.fromkeys(DROP_REASONS, 0)
