"""The hostile probe of issue 18, through the launcher's own ``main`` (what
``scripts/flwr_run.sh`` runs): every bad input is one ``error:`` line and exit status 2
before any Flower process starts, and nothing that was there is lost or overwritten. The
checks run in this process (``check`` instead of ``check_apart``'s child) to keep them fast;
``tests/simulations/test_launcher.py`` covers the child and the script."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.lock import RunLock
from adc_flwr.run.run_dir import RunDir
from clients import client_app as client_module
from simulations import launcher, preflight, supervise
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.data.test_damaged import idx_bytes, write_idx
from tests.run.test_run_dir import plant_checkpoint
from tests.simulations.test_launcher import finish, launch
from tests.support.helpers import run_server_app, tiny_config

TINY = "dataset='digits' method='none' batch-size=16 eval-samples=64 local-steps=3 lr=0.001"
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1"


class FlowerStarted(AssertionError):
    """A refused run got as far as starting Flower."""


@pytest.fixture
def refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run the launcher as flwr_run.sh does, checks in process, Flower forbidden; returns
    (exit status, stderr)."""
    monkeypatch.setattr(supervise, "check_apart", preflight.check)

    def no_flower(*_: object) -> None:
        raise FlowerStarted

    monkeypatch.setattr(launcher.Simulation, "run", no_flower)
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("RUN_NAME", "probe")

    def run(run_config: str, federation: str = FEDERATION, **env: str) -> tuple[int, str]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        status = launcher.main([run_config, federation])
        return status, capsys.readouterr().err

    return run


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../../escape", r"must be one folder name: no '/'"),
        ("two\nlines", r"must not hold control characters"),
        ("x" * 300, r"is 300 bytes long; at most 200"),
        ("..", r"must be a folder name, not '\.' or '\.\.'"),
        ("-rf", r"must not start with '-'"),
    ],
    ids=["path", "newline", "long", "dotdot", "dash"],
)
def test_a_run_name_is_one_folder_name(refuse, tmp_path: Path, name: str, message: str) -> None:
    status, err = refuse(TINY, RUN_NAME=name)
    assert status == 2 and re.search(message, one_error_line(err))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ("budget-mb=1e999", r"'budget-mb' = inf: must be a finite number"),
        ("weight-decay=inf", r"'weight-decay' = inf: must be a finite number"),
        ("snr-db='nan'", r"'snr-db'"),
    ],
)
def test_infinite_and_nan_values_are_refused(refuse, pairs: str, message: str) -> None:
    status, err = refuse(f"{TINY} {pairs}")
    assert status == 2
    assert re.search(message, one_error_line(err))


def test_an_unknown_federation_key_is_refused(refuse) -> None:
    status, err = refuse(TINY, "num-supernodes=2 client-resources-num-cpu=1")
    line = one_error_line(err)
    assert status == 2 and "federation key 'client-resources-num-cpu' is unknown" in line


def test_an_out_dir_that_cannot_be_made_names_it(refuse, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, err = refuse(TINY, OUT_DIR=str(blocker / "sub"))
    line = one_error_line(err)
    assert status == 2 and str(blocker / "sub") in line and "Not a directory" in line
    assert blocker.read_text() == "not a folder"


def test_someone_elses_folder_is_not_taken_over(refuse, tmp_path: Path) -> None:
    theirs = tmp_path / "out" / "probe"
    theirs.mkdir(parents=True)
    for name, text in (
        ("summary.json", '{"theirs": 1}'),
        ("notes.txt", "mine"),
        ("profiles.csv", "x"),
    ):
        (theirs / name).write_text(text)
    status, err = refuse(TINY)
    line = one_error_line(err)
    assert status == 2 and "holds files that are not a run's (notes.txt) and no config.json" in line
    assert (theirs / "summary.json").read_text() == '{"theirs": 1}'
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "profiles.csv", "summary.json"]


def resumable_run(tmp_path: Path) -> RunConfig:
    """A finished round 1 of 2 (a checkpoint, then the process "died")."""
    cfg = tiny_config(tmp_path / "out", run_name="probe", num_server_rounds=2)
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    from strategies.step_engine import StepEngine

    real = StepEngine.server_step
    calls = {"n": 0}

    def die_in_round_2(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > cfg.local_steps:
            raise SystemExit("killed")
        return real(self, *args, **kwargs)

    StepEngine.server_step = die_in_round_2
    try:
        with pytest.raises(SystemExit):
            run_training(grid, cfg, progress=lambda _: None)
    finally:
        StepEngine.server_step = real
    return cfg


def test_a_damaged_resume_is_refused_before_flower(refuse, tmp_path: Path) -> None:
    cfg = resumable_run(tmp_path)
    metrics = RunDir(cfg.run_dir).metrics_path
    metrics.write_text(metrics.read_text().split("\n", 1)[0] + "\n")  # rows gone
    status, err = refuse(TINY + " num-server-rounds=2")
    assert status == 2 and "metrics.csv holds 0 complete rows" in one_error_line(err)


def test_a_planted_checkpoint_is_refused_and_never_run(refuse, tmp_path: Path) -> None:
    cfg = resumable_run(tmp_path)
    marker = tmp_path / "pwned"
    plant_checkpoint(cfg.run_dir, marker)
    status, err = refuse(TINY + " num-server-rounds=2")
    assert status == 2 and "is not a checkpoint this project wrote" in one_error_line(err)
    assert not marker.exists()


def test_damaged_data_is_named_before_flower(refuse, tmp_path: Path) -> None:
    folder = write_idx(tmp_path / "idx", {("test", "labels"): idx_bytes(np.array([0] * 9 + [200]))})
    status, err = refuse(f"data-dir='{folder}' batch-size=8 local-steps=1 eval-samples=5")
    line = one_error_line(err)
    assert status == 2 and "the test split holds 1 label(s) outside 0..9" in line


def test_a_trace_outside_physics_names_file_line_and_column(refuse, tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "name,uplink_mbps,downlink_mbps,latency_s,gflops,availability,dropout\n"
        "fine,10,20,0.01,10,1,0\n"
        "fast,1e308,20,0.01,1e-300,1,0\n"
    )
    status, err = refuse(f"{TINY} profile-trace='{trace}'")
    line = one_error_line(err)
    assert status == 2 and f"profile-trace {trace} line 3, column 'uplink_mbps'" in line
    assert "(0, 100000] Mbit/s" in line


def test_files_follow_the_umask_and_a_full_disk_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run files are created as the umask says (not 0600); an OSError writing the checkpoint
    is one line naming the file; a rerun with room resumes and completes."""
    cfg = tiny_config(tmp_path, num_server_rounds=2)
    old = os.umask(0o002)
    try:
        real = torch.save
        calls = {"n": 0}

        def disk_full(obj, f, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # round 2's checkpoint
                raise OSError(28, "No space left on device")
            return real(obj, f, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(torch, "save", disk_full)
            grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
            with pytest.raises(Exception, match="No space left on device"):
                run_training(grid, cfg, progress=lambda _: None)
        summary = RunDir(cfg.run_dir).read_summary()
        assert summary["status"] == "failed" and "No space left on device" in summary["error"]
        grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
        assert run_training(grid, cfg, progress=lambda _: None)["status"] == "completed"
        modes = {p.name: p.stat().st_mode & 0o777 for p in cfg.run_dir.iterdir()}
        assert set(modes.values()) == {0o664}, modes
    finally:
        os.umask(old)


def test_a_client_lost_for_good_is_named_with_the_rounds_it_missed(tmp_path: Path) -> None:
    """A client whose worker dies after round 1 (it raises from then on): the rounds go on
    without it, and the summary says which client, which rounds, and why."""
    cfg = tiny_config(tmp_path, num_server_rounds=3)
    rounds: list[int] = []

    def worker_dies(pid: int, message) -> None:
        if message.metadata.message_type == "train.start" and pid == 0:
            rounds.append(int(message.content["config"]["server-round"]))
        if (
            pid == 0
            and rounds
            and rounds[-1] >= 2
            and message.metadata.message_type != "query.info"
        ):
            raise RuntimeError("the actor died")

    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config(), before_call=worker_dies)
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    assert summary["clients_missed"] == [
        {"partition": 0, "rounds": [2, 3], "reason": "error: RuntimeError: the actor died"}
    ]


@pytest.mark.slow  # two real runs on Ray: in .ci/run, out of the default suite
def test_a_twin_run_is_refused_within_seconds_and_the_first_completes(tmp_path: Path) -> None:
    config = f"{TINY} num-server-rounds=2"
    first = launch(tmp_path, "twin", config)
    lock = tmp_path / "twin" / ".lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    started = time.monotonic()
    code, twin_out = finish(launch(tmp_path, "twin", config), timeout=120)
    assert code == 2, twin_out
    assert "is in use by PID" in twin_out and "one run writes a run directory" in twin_out
    assert time.monotonic() - started < 30  # the checks, then the lock: seconds
    code, out = finish(first)
    assert code == 0, out
    metrics = RunDir(tmp_path / "twin").read_metrics()
    assert not metrics.duplicated(subset=["kind", "round", "step"]).any()


@pytest.mark.slow  # a real run on Ray killed with -9: in .ci/run, out of the default suite
def test_kill_9_of_the_launchers_group_leaves_nothing_and_a_rerun_resumes(
    tmp_path: Path,
) -> None:
    """No process of the run is left a minute after kill -9 of the launcher's process
    group (the SuperLink lives in a session of its own), its private directory goes, and the
    same command then resumes the run and completes it."""
    # 40 rounds of a quarter second: the log stream runs seconds behind the rounds, so with
    # few rounds the kill can land after the run has finished (CI saw it with 3)
    config = f"{TINY} num-server-rounds=40"
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("adcf.*"))
    proc = launch(tmp_path, "killed", config, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until a round is checkpointed
        if line.startswith("round"):
            break
    holder = RunLock(tmp_path / "killed").holder()
    assert holder is not None
    run_procs = [p for p in psutil.process_iter() if _carries(p, holder.token)]
    assert len(run_procs) > 3  # the SuperLink, the simulation, Ray and its actors
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole process group
    proc.wait()
    _, alive = psutil.wait_procs(run_procs, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("adcf.*")) <= before
    killed = RunDir(tmp_path / "killed")
    early = killed.read_summary() or {}
    assert early.get("status") != "completed", "the kill landed after the run had finished"
    code, out = finish(launch(tmp_path, "killed", config))
    assert code == 0 and "resuming" in out, out
    summary = killed.read_summary()
    assert summary["status"] == "completed" and summary["rounds"] == 40


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get("ADC_RUN_TOKEN") == token
    except (psutil.Error, OSError):
        return False


def test_a_deployment_can_pin_where_runs_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ADC_OUT_ROOT in its environment the ServerApp refuses an out-dir outside it,
    before it makes anything there; inside it, the run goes on."""
    monkeypatch.setenv("ADC_OUT_ROOT", str(tmp_path / "root"))
    outside = tiny_config(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"this deployment writes runs under ADC_OUT_ROOT="):
        run_server_app(outside, 2)
    assert not (tmp_path / "elsewhere").exists()
    summary, _ = run_server_app(tiny_config(tmp_path / "root" / "mine"), 2)
    assert summary is not None and summary["status"] == "completed"


def test_the_sweeps_records_agree_with_its_runs(studies_sweep: Path) -> None:
    """sweep.json, table.csv and each run's summary.json give a point one status, in plain
    words (no terminal colour codes)."""
    import json

    import pandas as pd

    text = (studies_sweep / "sweep.json").read_text()
    assert "\x1b" not in text and "\x1b" not in (studies_sweep / "table.csv").read_text()
    recorded = json.loads(text)["results"]
    table = pd.read_csv(studies_sweep / "table.csv").set_index("run")
    assert any(r["status"] == "failed" for r in recorded.values())
    for name, result in recorded.items():
        summary = RunDir(studies_sweep / name).read_summary()
        assert summary is not None and result["status"] == summary["status"], name
        assert table.loc[name, "status"] == summary["status"], name
