"""Sweeps on Ray (``--workers``): the same numbers as one point at a time, today's skip and
failure rules, and a Ctrl-C that leaves no worker. Through the sweep's own command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from adc_flwr.run.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = """
[sweep]
description = "points on Ray"
nodes = 2

[base]
dataset = "digits"
batch-size = 16
local-steps = 2
eval-samples = 32

[[grid]]
method = ["none", "adc"]
num-server-rounds = [{rounds}]
seed = [1, 2]
"""


def sweep(tmp_path: Path, root: str, *args: str, rounds: int = 1, **popen) -> subprocess.Popen:
    experiment = tmp_path / "ray_points.toml"
    experiment.write_text(EXPERIMENT.format(rounds=rounds))
    argv = [sys.executable, "-m", "simulations.sweep", str(experiment)]
    argv += ["--results-root", str(tmp_path / root), *args]
    env = os.environ | {"RAY_ADDRESS": ""}
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def tables(out: Path) -> dict[str, pd.DataFrame]:
    frames = {}
    for metrics in sorted(out.rglob("metrics.csv")):
        run = metrics.parent
        frames[run.name] = pd.read_csv(metrics).drop(columns=["wall_time_s"])
        frames[run.name + "/clients"] = pd.read_csv(run / "clients.csv")
    return frames


def _ctrl_c_as_at_a_terminal() -> None:
    """SIGINT as a foreground process at a terminal has it: a shell without job control
    (a CI script's ``cmd &``) starts its background children with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ray_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or "")
        if "raylet" in text or "ray::" in text or "gcs_server" in text:
            found.append(proc)
    return found


@pytest.mark.slow  # Ray starts twice and runs eight points: in .ci/run, out of the default suite
def test_two_workers_give_one_workers_numbers_and_skip_what_is_done(tmp_path: Path) -> None:
    code, out = finish(sweep(tmp_path, "w2", "--workers", "2", "--point-cpus", "1"))
    assert code == 0, out
    code, one = finish(sweep(tmp_path, "w1", "--workers", "1", "--point-cpus", "1"))
    assert code == 0, one
    two, single = tables(tmp_path / "w2"), tables(tmp_path / "w1")
    assert len(two) == 8 and two.keys() == single.keys()
    for name, frame in two.items():
        pd.testing.assert_frame_equal(frame, single[name], check_exact=True)
    code, again = finish(sweep(tmp_path, "w2", "--workers", "2"))
    assert code == 0 and "0 ran, 4 skipped, 0 failed" in again, again
    table = pd.read_csv(next((tmp_path / "w2").rglob("table.csv")))
    assert len(table) == 4 and set(table["status"]) == {"completed"}


@pytest.mark.slow  # a real Ctrl-C of a parallel sweep, then its rerun
def test_ctrl_c_interrupts_every_running_point_and_leaves_no_worker(tmp_path: Path) -> None:
    before = {p.pid for p in ray_processes()}
    proc = sweep(
        tmp_path,
        "ctrl",
        "--workers",
        "2",
        "--verbose",
        rounds=400,
        start_new_session=True,
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )
    out = tmp_path / "ctrl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # both points have written a round
        if len(list(out.rglob("checkpoint.pt"))) >= 2:
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("no two points checkpointed in 300 s")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    code, text = finish(proc)
    assert code == 130, text
    statuses = {
        run.name: RunDir(run).read_summary()["status"]
        for run in out.rglob("*")
        if (run / "summary.json").exists()
    }
    assert sorted(statuses.values()) == ["interrupted", "interrupted"], statuses
    recorded = json.loads(next(out.rglob("sweep.json")).read_text())["results"]
    assert {r["status"] for r in recorded.values()} <= {"interrupted"}
    _, alive = psutil.wait_procs([p for p in ray_processes() if p.pid not in before], timeout=30)
    assert not alive, [p.info for p in alive]
