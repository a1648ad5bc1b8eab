"""The one supervisor's clean-up (``simulations.supervise``, under ``simulations.launcher``
and ``simulations.deploy``) in this process, with Flower faked: wherever a stop signal lands,
every process is stopped and the private directory removed; a run that fails before its
ServerApp makes the run directory leaves Flower's logs where the verdict says they are."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import psutil
import pytest

from adc_flwr.run.lock import TOKEN_ENV
from adc_flwr.run.run_dir import RunDir
from simulations import deploy, launcher, reaper, supervise
from simulations.local_deployment import DeploymentError
from simulations.reaper import start_watchdog
from simulations.stopping import STOP_SIGNALS
from simulations.supervise import EXIT_FAILED, EXIT_INTERRUPTED


class FakeDeployment:
    """What deploy uses of a LocalDeployment: its home, its processes by name, their logs."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        assert env["ADC_OUT_ROOT"] == str(Path(env["OUT_DIR"]).resolve())  # the run's out-dir
        self.home = home
        self.procs: dict[str, None] = {}
        self.cli_env: dict[str, str] = {}

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"


def start_deployment(fed: FakeDeployment, nodes: int) -> None:
    """Every process "started": a log each."""
    for name in ["superlink", *(f"supernode-{i}" for i in range(nodes))]:
        fed.log(name).parent.mkdir(parents=True, exist_ok=True)
        fed.log(name).write_text(f"{name} log\n")
        fed.procs[name] = None


def refused(fed: FakeDeployment, nodes: int) -> None:
    start_deployment(fed, nodes)
    raise DeploymentError("supernode-1 exited (305) before it came online")


class FlwrRunFailsEarly:
    """``flwr run`` failing before any ServerApp starts: exit status 1, nothing written."""

    def __init__(self, command: Sequence[str], **_: object) -> None:
        self.command = command

    def wait(self) -> int:
        return 1


WATCHDOG_PID = 4242


class FakeWatchdog:
    pid = WATCHDOG_PID


class Record:
    """How many private directories were made, how often every process was stopped, and
    the watchdogs started and dismissed."""

    def __init__(self, private: Path) -> None:
        self.private = private
        self.made = self.stopped = 0
        self.watchdogs: list[str] = []  # "started" / "dismissed" as they happened

    def left(self) -> list[Path]:
        return list(self.private.iterdir())


@pytest.fixture
def faked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Record]:
    """Both launchers with Flower, the checks and the reaping faked; private directories
    under ``tmp_path/private``; the signal handlers and mask put back afterwards."""
    record = Record(tmp_path / "private")
    record.private.mkdir()
    mkdtemp = tempfile.mkdtemp

    def private_dir(prefix: str | None = None) -> str:
        record.made += 1
        return mkdtemp(prefix=prefix, dir=record.private)

    def stop_descendants(spare: tuple[int, ...] = ()) -> None:
        assert spare == (WATCHDOG_PID,)  # the watchdog outlives the clean-up it watches
        record.stopped += 1

    def start_watchdog(token: str, home: Path) -> FakeWatchdog:
        assert token and home.parent == record.private
        record.watchdogs.append("started")
        return FakeWatchdog()

    def dismiss_watchdog(watchdog: FakeWatchdog | None) -> None:
        if watchdog is not None:
            record.watchdogs.append("dismissed")

    monkeypatch.setattr(supervise, "check_apart", lambda *_: "new")
    monkeypatch.setattr(supervise, "become_subreaper", lambda: True)
    monkeypatch.setattr(supervise, "stop_descendants", stop_descendants)
    monkeypatch.setattr(supervise, "start_watchdog", start_watchdog)
    monkeypatch.setattr(supervise, "dismiss_watchdog", dismiss_watchdog)
    monkeypatch.setattr(tempfile, "mkdtemp", private_dir)
    monkeypatch.setattr(subprocess, "Popen", FlwrRunFailsEarly)
    monkeypatch.setattr(deploy, "LocalDeployment", FakeDeployment)
    monkeypatch.setattr(deploy, "start_deployment", start_deployment)
    # no run starts here, so there is no checkpoint to write an interrupted summary from
    monkeypatch.setattr(supervise, "mark_interrupted", lambda *_: None)
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield record
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@pytest.mark.parametrize("start", [start_deployment, refused], ids=["flwr-run", "federation"])
def test_an_early_failure_keeps_flowers_logs_where_the_verdict_says(
    faked: Record,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    start: Callable[[FakeDeployment, int], None],
) -> None:
    """``flwr run`` (or the deployment) fails before the ServerApp makes the run directory:
    it is made for Flower's logs, which the error names, before the private copy goes."""
    monkeypatch.setattr(deploy, "start_deployment", start)
    monkeypatch.setenv("RUN_NAME", "early")
    assert deploy.main(["2"]) == EXIT_FAILED
    err = capsys.readouterr().err
    named = re.search(r"(?:see |Flower's logs: )(\S+\.log(?:, \S+\.log)*)", err)
    assert named is not None, err
    logs = [Path(log) for log in named[1].split(", ")]
    assert [log.name for log in logs] == ["superlink.log", "supernode-0.log", "supernode-1.log"]
    assert {log.parent for log in logs} == {tmp_path / "out" / "early"}
    assert [log.read_text() for log in logs] == [f"{log.stem} log\n" for log in logs]
    assert faked.stopped == faked.made == 1 and not faked.left()
    assert faked.watchdogs == ["started", "dismissed"]


def test_an_early_failure_of_flwr_run_keeps_the_superlink_log(
    faked: Record, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The same for ``scripts/flwr_run.sh``: the SuperLink's log is kept where the error
    says, though the ServerApp never made the run directory."""

    class FlwrRunLogsAndFails(FlwrRunFailsEarly):
        def __init__(
            self, command: Sequence[str], env: dict[str, str] | None = None, **_: object
        ) -> None:
            super().__init__(command)
            log = Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
            log.parent.mkdir(parents=True)
            log.write_text("superlink log\n")

    monkeypatch.setattr(subprocess, "Popen", FlwrRunLogsAndFails)
    monkeypatch.setenv("RUN_NAME", "early")
    assert launcher.main([""]) == EXIT_FAILED
    err = capsys.readouterr().err
    kept = tmp_path / "out" / "early" / "superlink.log"
    assert f"see {kept} for Flower's log" in err
    assert kept.read_text() == "superlink log\n"
    assert faked.stopped == faked.made == 1 and not faked.left()
    assert faked.watchdogs == ["started", "dismissed"]


def test_a_failed_run_exits_1_though_flwr_run_exits_0(
    faked: Record, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``flwr run`` exits 0 when the ServerApp raises; the verdict is the summary's: exit
    status 1 and one line naming the status and the error (on Ray, in the slow tier:
    ``tests/simulations/test_flwr_run.py``)."""

    class FlwrRunWhoseServerAppFails(FlwrRunFailsEarly):
        def wait(self) -> int:
            RunDir(tmp_path / "out" / "bad").write_summary(
                {"status": "failed", "error": "RuntimeError: the loss diverged"}
            )
            return 0

    monkeypatch.setattr(subprocess, "Popen", FlwrRunWhoseServerAppFails)
    monkeypatch.setenv("RUN_NAME", "bad")
    assert launcher.main([""]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "run bad did not complete (status failed): RuntimeError: the loss diverged" in err
    assert faked.stopped == faked.made == 1 and not faked.left()


def interrupt_at(code: CodeType, opcode: int | None) -> Callable[[], int]:
    """Trace the frames of ``code``: SIGINT is raised before its ``opcode``-th instruction
    (never, for None); returns how many instructions ran."""
    count = 0

    def local(frame: FrameType, event: str, _arg: object) -> Any:
        nonlocal count
        if event == "opcode":
            if count == opcode:
                signal.raise_signal(signal.SIGINT)  # its handler runs here, or it is held
            count += 1
        return local

    def calls(frame: FrameType, _event: str, _arg: object) -> Any:
        if frame.f_code is code:
            frame.f_trace_opcodes = True
            return local
        return None

    sys.settrace(calls)
    return lambda: count


@pytest.mark.parametrize(
    ("main", "args"), [(deploy.main, ["2"]), (launcher.main, [""])], ids=["deploy", "launcher"]
)
def test_a_stop_signal_anywhere_still_stops_everything(
    faked: Record, monkeypatch: pytest.MonkeyPatch, main: Any, args: list[str]
) -> None:
    """SIGINT before each instruction of the supervisor in turn, under either job, the end of
    the run and the start of its clean-up included: every time, whatever was started is
    stopped, the private directory is removed, no exception escapes and the signal mask is
    put back."""
    code = supervise.run_supervised.__code__
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    tracer = sys.gettrace()
    outcomes = []
    opcode: int | None = None
    total = 1
    while opcode is None or opcode < total:
        monkeypatch.setenv("RUN_NAME", f"at-{opcode}")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ran = interrupt_at(code, opcode)
        try:
            status = main(args)
        finally:
            sys.settrace(tracer)
        where = f"SIGINT before instruction {opcode}"
        assert not faked.left(), where
        assert faked.stopped == faked.made, where
        assert faked.watchdogs.count("started") == faked.watchdogs.count("dismissed"), where
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), where
        outcomes.append(status)
        if opcode is None:
            assert status == EXIT_FAILED
            total = ran()
        opcode = 0 if opcode is None else opcode + 1
    assert total > 100  # the trace saw the whole launcher
    assert set(outcomes) == {EXIT_FAILED, EXIT_INTERRUPTED}


# Stands for the raylet's restart of its agents, which the watchdog cannot see: the agent
# (argv[1], a JSON command) is started, started again a second after it died, and left to
# init; each agent's PID is appended to argv[2].
RESPAWNER = """
import json, subprocess, sys, time
command = json.loads(open(sys.argv[1]).read())
def start():
    agent = subprocess.Popen(command, start_new_session=True)
    with open(sys.argv[2], "a") as pids:
        pids.write(f"{agent.pid}\\n")
    return agent
start().wait()
time.sleep(1.0)
start()
"""


def test_the_watchdog_ends_a_ray_session_whose_agents_lost_the_token(tmp_path: Path) -> None:
    """The launcher dies (its watchdog's pipe closes, nothing said): a process carrying the
    token (the raylet) is killed, and so is an agent without the token whose command line
    names the run's Ray session in the private directory, the second time too, after it was
    started again (issue 27, item 10); the private directory goes."""
    token = f"test-{secrets.token_hex(8)}"
    home = tmp_path / "adcf.private"
    session = home / "ray" / "session_2026-01-01_00-00-00_000000_1"
    session.mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    (tmp_path / "agent.json").write_text(json.dumps([*sleep, f"--session-dir={session}"]))
    pids = tmp_path / "agents"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    raylet = subprocess.Popen(sleep, env=env | {TOKEN_ENV: token})
    respawner = subprocess.Popen(
        [sys.executable, "-c", RESPAWNER, str(tmp_path / "agent.json"), str(pids)], env=env
    )
    watchdog = None
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:  # the first agent runs
            time.sleep(0.1)
        watchdog = start_watchdog(token, home)
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # the launcher died without saying done
        assert watchdog.wait(timeout=60) == 0
        assert raylet.wait(timeout=5) == -signal.SIGKILL
        alive = [pid for pid in pids.read_text().split() if _running(int(pid))]
        assert not alive, f"agents {alive} outlived the watchdog"
        assert respawner.wait(timeout=10) == 0  # it started the agent again: the trigger
        assert len(pids.read_text().split()) == 2
        assert not home.exists()
    finally:
        for proc in (raylet, respawner, watchdog):
            if proc is not None:
                proc.kill()
                proc.wait()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_launcher_under_nohup_keeps_ignoring_sighup() -> None:
    """``nohup scripts/flwr_run.sh`` starts the launcher with SIGHUP ignored: a closed
    terminal must not stop the run, while SIGINT and SIGTERM still do."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        reaper.handle_stop_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is reaper.raise_interrupted
        assert signal.getsignal(signal.SIGINT) is reaper.raise_interrupted
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_rerun_ends_what_a_dead_launcher_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run directory's previous launcher died with -9 and its watchdog with it: the next
    launcher kills what carries the old token and, as the watchdog would, an agent without
    the token that names the dead launcher's private directory; that directory goes."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    home = tmp_path / f"adcx.{dead.pid}.private"
    session = home / "ray" / "session_1"
    session.mkdir(parents=True)
    token = f"test-{secrets.token_hex(8)}"
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    procs = [
        subprocess.Popen(sleep, env=env | {TOKEN_ENV: token}),
        subprocess.Popen([*sleep, f"--session-dir={session}"], env=env),
    ]
    try:
        assert supervise.remove_stale_homes("adcx.", token) == 2
        for proc in procs:  # psutil reaped them: Popen only sees that they are gone
            proc.wait(timeout=5)
        assert not home.exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
