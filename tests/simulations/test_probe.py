"""The hostile probe of issue 18, through the launcher's own ``main`` (what
``scripts/flwr_run.sh`` runs): every bad input is one ``error:`` line and exit status 2
before any Flower process starts, and nothing that was there is lost or overwritten. The
checks run in this process (``check`` instead of ``check_apart``'s child) to keep them fast;
``tests/simulations/test_launcher.py`` covers the child and the script."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.files import RunDirError
from adc_flwr.run.lock import RunLock
from adc_flwr.run.run_dir import RunDir
from clients import client_app as client_module
from simulations import launcher, preflight, supervise
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.data.test_damaged import idx_bytes, write_idx, write_parquet
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


THEIRS = {"summary.json": '{"theirs": 1}', "profiles.csv": "x", "clients.csv": "a,b\n1,2\n"}


@pytest.mark.parametrize(
    "names", [("summary.json", "profiles.csv"), ("clients.csv",)], ids=["summary", "clients"]
)
def test_files_a_run_writes_without_its_config_are_someone_elses(
    refuse, tmp_path: Path, names: tuple[str, ...]
) -> None:
    """Issue 27: a run writes config.json before anything else, so a folder of run-named
    files without one is not a run's: refused before Flower, the files named, left as
    they were (the launcher, then the ServerApp as a plain ``flwr run`` starts it)."""
    theirs = tmp_path / "out" / "probe"
    theirs.mkdir(parents=True)
    for name in names:
        (theirs / name).write_text(THEIRS[name])
    status, err = refuse(TINY)
    line = one_error_line(err)
    assert status == 2 and f"holds {', '.join(sorted(names))} but no config.json" in line
    cfg = tiny_config(tmp_path / "out", run_name="probe")
    with pytest.raises(RunDirError, match=f"holds {', '.join(sorted(names))} but no config"):
        run_server_app(cfg, 2)
    assert {p.name: p.read_text() for p in theirs.iterdir()} == {n: THEIRS[n] for n in names}


def test_a_folder_whose_config_json_is_not_a_runs_is_someone_elses(refuse, tmp_path: Path) -> None:
    """A model's folder holds a config.json of its own: it names no run-config key, so the
    folder is not a run's, and neither the launcher nor the ServerApp overwrites it."""
    theirs = tmp_path / "out" / "probe"
    theirs.mkdir(parents=True)
    config = '{"model_type": "vit", "hidden_size": 192}'
    (theirs / "config.json").write_text(config)
    status, err = refuse(TINY)
    assert status == 2 and "config.json is not a run's config" in one_error_line(err)
    with pytest.raises(RunDirError, match=r"config\.json is not a run's config"):
        run_server_app(tiny_config(tmp_path / "out", run_name="probe"), 2)
    assert [p.name for p in theirs.iterdir()] == ["config.json"]
    assert (theirs / "config.json").read_text() == config


def test_a_launchers_own_leftovers_do_not_refuse_its_rerun(refuse, tmp_path: Path) -> None:
    """What a launcher leaves when ``flwr run`` failed before the ServerApp wrote anything
    (its lock, Flower's logs, no config.json) is a run's: the rerun goes on to Flower, and
    a ServerApp there runs and completes."""
    ours = tmp_path / "out" / "probe"
    ours.mkdir(parents=True)
    for name in (".lock", "superlink.log", "supernode-0.log", "supernode-1.log"):
        (ours / name).write_text("")
    with pytest.raises(FlowerStarted):
        refuse(TINY)
    summary, _ = run_server_app(tiny_config(tmp_path / "out", run_name="probe"), 2)
    assert summary is not None and summary["status"] == "completed"


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


@pytest.mark.parametrize("case", ["label-1e12", "one-class-folder"])
def test_data_that_would_size_or_lack_classes_is_one_line(
    refuse, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Issue 27: a label of 10^12 in a parquet column is named (the preflight built 10^12
    class names: MemoryError); an image folder of one class says so."""
    import datasets
    from PIL import Image

    if case == "label-1e12":
        labels = [0, 1, 2, 10**12, 0, 1]
        dataset = write_parquet(tmp_path / "p", labels, datasets.Value("int64"))
        message = "column 'label' holds label 1000000000000 in row 3 of split 0"
    else:
        (tmp_path / "imgs" / "cat").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / f"imgs/cat/{i}.png")
        dataset = f"imagefolder:{tmp_path / 'imgs'}"
        message = "its images are all of one class (folder "
    capsys.readouterr()  # datasets' progress bars while writing the files
    status, err = refuse(TINY.replace("'digits'", f"'{dataset}'"))
    assert status == 2 and message in one_error_line(err)


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


def fill_disk(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Every write under ``folder`` fails as on a full disk (ENOSPC): the lock's record, the
    fsync of an atomic write, a copy (which leaves a partial file, as the kernel does)."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def under(fd: int) -> bool:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(folder)

    real_pwrite, real_fsync, real_copy = os.pwrite, os.fsync, shutil.copyfile

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if under(fd):
            raise full
        return real_pwrite(fd, data, offset)

    def fsync(fd: int) -> None:
        if under(fd) and Path(os.readlink(f"/proc/self/fd/{fd}")).is_file():
            raise full
        real_fsync(fd)

    def copyfile(src: Path, dst: Path, **kwargs: object) -> Path:
        if Path(dst).is_relative_to(folder):
            Path(dst).write_bytes(Path(src).read_bytes()[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "copyfile", copyfile)


def test_a_full_disk_at_the_lock_is_one_line_naming_it(
    refuse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27: not even the lock's record fits: one line naming .lock and ENOSPC."""
    fill_disk(monkeypatch, tmp_path / "out")
    status, err = refuse(TINY)
    line = one_error_line(err)
    assert status == 2 and str(tmp_path / "out" / "probe" / ".lock") in line
    assert "No space left on device (ENOSPC)" in line


def test_a_full_disk_after_the_lock_names_what_could_not_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27: the lock fits, nothing else does: the ServerApp cannot write config.json
    nor its failed summary, Flower's log cannot be copied; the launcher's last line names
    the file and ENOSPC (not just "could not be kept"), exit 1, no partial copy left."""
    monkeypatch.setattr(supervise, "check_apart", preflight.check)
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("RUN_NAME", "probe")
    run_dir = tmp_path / "out" / "probe"

    def server_app_on_a_full_disk(self, home: Path, run_config: str) -> None:
        log = home / "local-superlink" / "superlink.log"
        log.parent.mkdir(parents=True)
        fill_disk(monkeypatch, run_dir)  # from here on, after the lock
        try:
            run_server_app(tiny_config(run_dir.parent, run_name="probe"), 2)
        except RunDirError as exc:  # Flower logs the ServerApp's error and goes on
            log.write_text(f"ServerApp failed: {exc}\n")

    monkeypatch.setattr(launcher.Simulation, "run", server_app_on_a_full_disk)
    status = launcher.main([TINY, FEDERATION])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert status == 1 and "Traceback" not in err
    assert last.startswith("run probe did not complete: it wrote no summary")
    full = "cannot be written: No space left on device (ENOSPC)"
    assert f"{run_dir / 'superlink.log'} {full}" in last
    assert not (run_dir / "superlink.log").exists() and not (run_dir / "summary.json").exists()


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
    (home,) = Path(os.environ.get("TMPDIR", "/tmp")).glob(f"adcf.{holder.pid}.*")
    assert _naming(home)  # Ray's session (raylet, GCS, agents) lives in the private dir
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole process group
    proc.wait()
    _, alive = psutil.wait_procs(run_procs, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    # nor any process of its Ray session, the agents the raylet starts without the token
    # included (issue 27, item 10): none after a minute, none come back
    deadline = time.monotonic() + 60
    while _naming(home) and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)
    assert not _naming(home), [p.cmdline() for p in _naming(home)]
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("adcf.*")) <= before
    killed = RunDir(tmp_path / "killed")
    early = killed.read_summary() or {}
    assert early.get("status") != "completed", "the kill landed after the run had finished"
    code, out = finish(launch(tmp_path, "killed", config))
    assert code == 0 and "resuming" in out, out
    summary = killed.read_summary()
    assert summary["status"] == "completed" and summary["rounds"] == 40


def _naming(home: Path) -> list[psutil.Process]:
    """Processes whose command line or environment names ``home`` or a path below it."""
    found = []
    for proc in psutil.process_iter():
        try:
            words = [*proc.cmdline(), *proc.environ().values()]
        except (psutil.Error, OSError):
            continue
        if any(word == str(home) or f"{home}/" in word for word in words):
            found.append(proc)
    return found


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
