"""Sweeps on Ray (``--workers``): the same numbers as one point at a time, today's skip and
failure rules, and a Ctrl-C, SIGTERM or SIGHUP that leaves no worker. Through the sweep's
own command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from adc_flwr.run.run_dir import RunDir
from simulations import parallel
from simulations.stopping import STOP_SIGNALS, Stopped, raise_stopped

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


# a point done before the signal (the rerun skips it), then two long ones it stops
STOPPED_EXPERIMENT = """
[sweep]
nodes = 2

[base]
dataset = "digits"
batch-size = 16
local-steps = 2
eval-samples = 32

[[grid]]
method = ["none"]
seed = [1]
num-server-rounds = [1]

[[grid]]
method = ["none", "adc"]
seed = [2]
num-server-rounds = [400]
"""
SHORT = "none-s1-num-server-rounds1"


def sweep(
    tmp_path: Path, root: str, *args: str, rounds: int = 1, text: str = EXPERIMENT, **popen
) -> subprocess.Popen:
    experiment = tmp_path / "ray_points.toml"
    experiment.write_text(text.format(rounds=rounds))
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


def _stop_signals_as_at_a_terminal() -> None:
    """SIGTERM and SIGHUP end a process unless it handles them (a test runner under
    ``nohup`` would hand its children SIGHUP ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


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


def _wait_for(out: Path, running: int, proc: subprocess.Popen) -> None:
    """Until the short point completed and ``running`` long ones have checkpointed a round."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        summary = RunDir(out / "ray_points" / SHORT).read_summary() or {}
        long = [c for c in out.rglob("checkpoint.pt") if c.parent.name != SHORT]
        if summary.get("status") == "completed" and len(long) >= running:
            return
        time.sleep(1)
    proc.kill()
    pytest.fail(f"no {running} long point(s) checkpointed in 400 s")


@pytest.mark.slow  # a real signal to a sweep on Ray and to one in process, then the rerun
@pytest.mark.parametrize(
    ("workers", "sig", "group"),
    [
        ("2", signal.SIGTERM, True),  # as `timeout` or a job scheduler: the whole group
        ("1", signal.SIGTERM, False),  # as `kill PID` or systemd's main-process stop
        ("1", signal.SIGHUP, False),  # the terminal closed
    ],
)
def test_stop_signals_interrupt_the_running_points_and_leave_nothing(
    tmp_path: Path, workers: str, sig: signal.Signals, group: bool
) -> None:
    before = {p.pid for p in ray_processes()}
    out = tmp_path / "stopped"
    proc = sweep(
        tmp_path,
        "stopped",
        "--workers",
        workers,
        text=STOPPED_EXPERIMENT,
        start_new_session=True,
        preexec_fn=_stop_signals_as_at_a_terminal,
    )
    _wait_for(out, int(workers), proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    code, text = finish(proc)
    assert code == 130 and f"sweep interrupted ({sig.name})" in text, text
    runs = out / "ray_points"
    statuses = {
        run.name: RunDir(run).read_summary()["status"]
        for run in runs.iterdir()
        if (run / "summary.json").exists()
    }
    stopped = sorted(name for name in statuses if name != SHORT)
    assert statuses[SHORT] == "completed" and len(stopped) == int(workers), statuses
    assert {statuses[name] for name in stopped} == {"interrupted"}, statuses
    recorded = json.loads((runs / "sweep.json").read_text())["results"]
    assert {name: r["status"] for name, r in recorded.items()} == statuses
    table = pd.read_csv(runs / "table.csv").set_index("run")["status"].to_dict()
    assert table == statuses
    _, alive = psutil.wait_procs([p for p in ray_processes() if p.pid not in before], timeout=60)
    assert not alive, [p.info for p in alive]
    assert not list(Path(tempfile.gettempdir()).glob(f"adcs.{proc.pid}.*"))  # Ray's temp dir
    code, again = finish(
        sweep(tmp_path, "stopped", "--only", f"name={SHORT}", text=STOPPED_EXPERIMENT)
    )
    assert code == 0 and "0 ran, 1 skipped, 0 failed" in again, again


def test_a_stop_during_ray_init_leaves_later_stop_signals_ignored() -> None:
    """A SIGHUP lands while ``ray.init`` runs (its SIGTERM handler in place): the sweep's
    one-shot handler takes it, and the SIGTERM handler put back after ``ray.init`` must not
    re-arm it, or a second SIGTERM would cut the cancelled points' grace short."""
    go, sent = threading.Event(), threading.Event()

    def send() -> None:  # a thread that does not hold the signals, as tqdm's
        go.wait(10)
        os.kill(os.getpid(), signal.SIGHUP)
        sent.set()

    class Ray:
        def init(self, **_: object) -> None:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(signal.SIGTERM))  # as Ray does
            go.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the sweep's handler raises in here
                time.sleep(0.01)
            raise AssertionError("no SIGHUP came")

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, raise_stopped)
        with pytest.raises(Stopped, match="SIGHUP"):
            parallel._init(Ray(), None, None)
        assert sent.is_set()
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == dict.fromkeys(
            STOP_SIGNALS, signal.SIG_IGN
        )
    finally:
        sender.join(10)
        for sig, handler in before.items():
            signal.signal(sig, handler)
