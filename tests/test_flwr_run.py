"""End to end through `flwr run .` on Ray (the README's run path), on a tiny configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def flwr_run(
    tmp_path: Path,
    run_name: str,
    run_config: str,
    federation: str = "num-supernodes=2 client-resources-num-cpus=1",
) -> subprocess.CompletedProcess:
    env = os.environ | {
        "OUT_DIR": str(tmp_path / "out"),
        "RUN_NAME": run_name,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "scripts/flwr_run.sh", run_config, federation],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def superlink_alive(flwr_home: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True)
    return found.returncode == 0


def test_flwr_run_trains_writes_summary_and_stops_superlink(tmp_path: Path) -> None:
    config = (
        "dataset='digits' num-server-rounds=2 local-steps=3 batch-size=16 eval-samples=100 "
        "method='adc' compression=0.25"
    )
    done = flwr_run(tmp_path, "ok", config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round   2/2" in done.stdout  # the per-round progress table streamed through
    run_dir = tmp_path / "out" / "ok"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert 0 < summary["compression_ratio"] < 0.4
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert (metrics["kind"] == "step").sum() == 2 * 3
    assert not superlink_alive(tmp_path / "flwr-home")


def test_flwr_run_failure_exits_nonzero(tmp_path: Path) -> None:
    """flwr run itself exits 0 when the ServerApp raises; our script must not."""
    done = flwr_run(tmp_path, "bad", "compression=5.0")
    assert done.returncode != 0
    assert "did not complete" in done.stderr
    assert not superlink_alive(tmp_path / "flwr-home")


TINY = "dataset='digits' batch-size=16 eval-samples=100 method='none' num-server-rounds=1"


@pytest.mark.parametrize(
    ("mode", "nodes", "fraction", "trained"), [("splitfed", 20, 0.25, 5), ("vanilla", 3, 1.0, 3)]
)
def test_flwr_run_trains_every_sampled_client(
    tmp_path: Path, mode: str, nodes: int, fraction: float, trained: int
) -> None:
    """Under Ray's random node ids each sampled partition trains (none is lost to a cursor
    indexed by partition id)."""
    config = f"{TINY} local-steps=2 sl-mode='{mode}' fraction-train={fraction}"
    done = flwr_run(tmp_path, mode, config, f"num-supernodes={nodes} client-resources-num-cpus=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / mode / "summary.json").read_text())
    assert summary["status"] == "completed"
    (row,) = summary["history"]
    assert (row["sampled"], row["clients"]) == (trained, trained)
    assert summary["drops"] == {"error": 0, "timeout": 0}
    assert f"clients {trained}/{trained}" in done.stdout
