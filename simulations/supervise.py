"""One supervisor for every way this project starts Flower from outside: ``flwr run`` on a
private simulation SuperLink (:mod:`simulations.launcher`, ``scripts/flwr_run.sh``, the
sweep's ``flwr`` runner) and a local TLS deployment (:mod:`simulations.deploy`,
``scripts/deploy_local.sh``).

``flwr run`` exits 0 when the run failed, and Flower detaches what it starts (a SuperLink
outlives ``flwr run``; the simulation process, Ray, SuperExec, ServerApp and ClientApp
processes outlive their parents). So :func:`supervise`, around whatever a :class:`Job`
starts:

1. checks the config first (:func:`simulations.preflight.check_apart`): a bad value or a run
   directory holding another run is one ``error:`` line and exit status 2, before any Flower
   or Ray process; a finished run is reported and not redone;
2. makes this process a child subreaper (Linux), so every process the run starts stays its
   descendant, and gives the job a private directory (Flower homes, Ray's temp dir, logs,
   certificates);
3. turns SIGINT, SIGTERM and SIGHUP into :class:`~simulations.reaper.Interrupted`; they are
   held while the private directory is made and from the end of the run to the end of the
   clean-up, so a signal landing anywhere still stops everything
   (``tests/simulations/test_cleanup.py`` proves it instruction by instruction);
4. at the end, on failure or on a signal, ends every descendant by PID (SIGTERM, then
   SIGKILL: some Ray agents ignore SIGTERM), keeps Flower's logs in the run directory when
   the run did not complete, and removes the private directory;
5. judges the run by the ``summary.json`` this invocation wrote, never an older one, and
   marks a run stopped by a signal ``interrupted`` (resumable).

Exit status: 0 completed (or already completed), 1 failed, no verdict or the job did not
start, 2 invalid arguments, config or run directory, 130 interrupted (rerun the same command
to resume).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from adc_flwr.config import ConfigError, run_name_problem
from adc_flwr.run.files import RunDirError, os_reason
from adc_flwr.run.lock import TOKEN_ENV, RunLock
from adc_flwr.run.resume import FINISHED
from adc_flwr.run.run_dir import SUMMARY_FILE, RunDir
from adc_flwr.run.summary import summary_from_checkpoint
from simulations.preflight import check_apart, parse_pairs, pinned_run_config, run_location
from simulations.reaper import (
    Interrupted,
    Watchdog,
    become_subreaper,
    dismiss_watchdog,
    handle_stop_signals,
    kill_until_quiet,
    leftovers,
    start_watchdog,
    stop_descendants,
)
from simulations.stopping import block_stop_signals, ignore_stop_signals, restore_signal_mask

ROOT = Path(__file__).resolve().parents[1]
EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130
# what every Flower process started here gets: no telemetry, no update check, no installs
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class StartFailed(Exception):
    """What the job starts did not come up; the message says which process and why."""


class Job(Protocol):
    """What runs under :func:`supervise`."""

    prefix: str  # of its private directory (short: Ray's socket paths live below it)
    what: str  # for "error: <what> did not start: ..."

    def run(self, home: Path, run_config: str) -> None:
        """Start Flower in the private directory ``home`` with ``run_config`` (pairs, with
        absolute ``out-dir`` and ``run-name``) and return when ``flwr run`` has exited;
        :class:`StartFailed` when a process it needs did not come up."""

    def logs(self, home: Path) -> Mapping[str, Path]:
        """Flower's logs to keep when the run did not complete: name in the run directory ->
        file (under ``home``, or anywhere)."""


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment) with :data:`FLOWER_ENV`, this interpreter's
    ``flwr`` first on ``PATH``, and passive OpenMP threads unless set (the ServerApp and the
    ClientApps share the cores; spinning threads would steal their time)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env |= FLOWER_ENV | {"PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def main(job: Job, run_config: str, federation_config: str) -> int:
    """:func:`supervise` ``job`` for the run the config and the environment name
    (``out-dir`` / ``run-name`` pairs win over ``OUT_DIR`` / ``RUN_NAME``); the exit status."""
    try:
        pairs = parse_pairs(run_config, "--run-config")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    out_dir, run_name = run_location(pairs, ROOT / "results")
    if problem := run_name_problem(run_name):  # before it becomes part of a path
        print(f"error: run name {run_name!r} (run-name or RUN_NAME) {problem}", file=sys.stderr)
        return EXIT_INVALID
    run_dir = Path(out_dir).expanduser().resolve() / run_name
    try:
        return supervise(job, run_config, federation_config, run_dir)
    except (KeyboardInterrupt, Interrupted):  # during the checks: nothing was started
        return EXIT_INTERRUPTED
    except RunDirError as exc:  # the verdict could not be read or written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def supervise(job: Job, run_config: str, federation_config: str, run_dir: Path) -> int:
    """Check, take the run directory's lock, run ``job``, clean up and judge, as the module
    docstring says; the exit status."""
    try:
        state = check_apart(run_config, federation_config, str(run_dir.parent), run_dir.name)
        pinned = pinned_run_config(run_config, run_dir)
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # a check that broke: still one line, still before Flower
        print(f"error: the checks failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if state == FINISHED:
        print(f"run {run_dir.name} already completed: {run_dir / SUMMARY_FILE}")
        return 0
    lock, token = RunLock(run_dir), f"{os.getpid()}-{secrets.token_hex(8)}"
    try:
        lock.acquire(token)
    except RunDirError as exc:  # busy, or the directory cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        # a launcher killed with -9 may have left its run's processes and private directory
        previous = lock.previous
        if remove_stale_homes(job.prefix, previous.token if previous else None) and previous:
            print(f"stopped what was left of the run of {previous} (its launcher died)")
        os.environ[TOKEN_ENV] = token  # every process the run starts inherits it
        if not become_subreaper():
            print("warning: not a child subreaper; a process Flower detaches may survive the run")
        return run_supervised(job, pinned, run_dir, token)
    finally:
        os.environ.pop(TOKEN_ENV, None)
        lock.release()


def run_supervised(job: Job, run_config: str, run_dir: Path, token: str) -> int:
    """The run itself, with the lock held: ``job`` in a private directory, a watchdog for
    the launcher's death, every process ended by PID at the end, the verdict."""
    interrupted: Interrupted | None = None
    failure: StartFailed | None = None
    watchdog: Watchdog | None = None
    logs: list[str] = []
    unkept = ""  # why Flower's logs could not be kept
    since = time.time_ns()
    # stop signals are held from here until their handler is in place, and again from the
    # end of the run to the end of the clean-up, so none can cut either short
    mask = block_stop_signals()
    home = Path(tempfile.mkdtemp(prefix=f"{job.prefix}{os.getpid()}."))
    try:
        try:
            watchdog = start_watchdog(token, home)
            handle_stop_signals()
            restore_signal_mask(mask)  # one that came meanwhile raises Interrupted here
            job.run(home, run_config)
        finally:
            block_stop_signals()  # or raises the Interrupted of one that came just before
    except Interrupted as exc:
        interrupted = exc
    except StartFailed as exc:
        failure = exc
    finally:
        try:
            stop_descendants(spare=() if watchdog is None else (watchdog.pid,))
            logs, unkept = keep_logs(job.logs(home), run_dir, since, interrupted is not None)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            dismiss_watchdog(watchdog)
            ignore_stop_signals(mask)  # the verdict is written whatever comes
    if failure is not None and interrupted is None:
        kept = f"\nFlower's logs: {', '.join(str(run_dir / log) for log in logs)}" if logs else ""
        kept += f"\nFlower's logs could not be kept: {unkept}" if unkept else ""
        print(f"error: {job.what} did not start: {failure}{kept}", file=sys.stderr)
        return EXIT_FAILED
    return verdict(run_dir, since, interrupted, logs, unkept)


def remove_stale_homes(prefix: str, token: str | None = None) -> int:
    """Private directories (``<prefix><pid>.*`` in the temp folder) whose launcher is gone,
    and what dead launchers left running, as their watchdog would end it
    (:mod:`simulations.watchdog`): the processes naming those directories (a Ray session
    there, its agents included) and those carrying ``token`` (the run directory's previous
    launcher's); how many processes were killed."""
    homes = []
    for home in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = home.name.removeprefix(prefix).split(".", 1)[0]
        if home.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            homes.append(home)
    killed = 0
    if homes or token:
        killed = kill_until_quiet(leftovers((TOKEN_ENV, token) if token else None, homes))
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)
    return killed


def fresh_summary(run_dir: Path, since_ns: int) -> dict | None:
    """The summary written after ``since_ns``, or None (absent, or left by an earlier run)."""
    path = run_dir / SUMMARY_FILE
    if not path.exists() or path.stat().st_mtime_ns <= since_ns:
        return None
    return RunDir(run_dir).read_summary()


def mark_interrupted(run_dir: Path, since_ns: int, interrupted_ns: int, reason: str) -> None:
    """Write an ``interrupted`` summary from the last checkpoint, unless the run never
    started (no config.json) or this invocation's run wrote its verdict before the
    interrupt (between ``since_ns`` and ``interrupted_ns``): a ``failed`` written after it
    is the interrupt's doing (its clients were killed under it) and is replaced."""
    path = run_dir / SUMMARY_FILE
    if not (run_dir / "config.json").exists():
        return
    if path.exists() and since_ns < path.stat().st_mtime_ns < interrupted_ns:
        return
    folder = RunDir(run_dir)
    folder.write_summary(summary_from_checkpoint(folder, "interrupted", reason))


def keep_logs(
    sources: Mapping[str, Path], run_dir: Path, since_ns: int, interrupted: bool
) -> tuple[list[str], str]:
    """Copy Flower's logs (name in the run directory -> file) there; the names kept, and
    why the rest were not ("" when none failed): the file that could not be written and the
    OS's reason (a full disk: ``No space left on device (ENOSPC)``); a partial copy goes.

    When the run was not interrupted and wrote no summary (``flwr run`` failed before the
    ServerApp made the run directory, say), the directory is made here: the verdict names
    these copies, and the originals go with the private directory.
    """
    summary = run_dir / SUMMARY_FILE
    kept: list[str] = []
    target = run_dir
    try:
        if not interrupted and not (summary.exists() and summary.stat().st_mtime_ns > since_ns):
            run_dir.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            if source.exists() and run_dir.exists():
                target = run_dir / name
                shutil.copyfile(source, target)
                kept.append(name)
    except OSError as exc:
        if target != run_dir:
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
        return kept, f"{target} cannot be written: {os_reason(exc)}"
    return kept, ""


def verdict(
    run_dir: Path,
    since_ns: int,
    interrupted: Interrupted | None,
    logs: Sequence[str],
    unkept: str = "",
) -> int:
    """The exit status of the run in ``run_dir``, started by this invocation at ``since_ns``,
    judged by the summary it wrote, with one line saying why (stdout when completed, else
    stderr).

    ``interrupted`` says a signal stopped it; ``logs`` are the Flower log files copied into
    ``run_dir`` (none: they could not be kept): named when no summary was written, removed
    when the run completed; ``unkept`` is why some could not be kept (:func:`keep_logs`).
    """
    name = run_dir.name
    summary = fresh_summary(run_dir, since_ns)
    if unkept and (summary is not None or interrupted is not None):  # else the last line says
        print(f"warning: Flower's logs could not be kept: {unkept}", file=sys.stderr)
    if interrupted is not None and (summary or {}).get("status") != "completed":
        reason = f"interrupted by {interrupted}"
        mark_interrupted(run_dir, since_ns, interrupted.at_ns, reason)
        print(f"run {name} {reason}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary is None:
        where = ", ".join(str(run_dir / log) for log in logs)
        what = "Flower's log" if len(logs) == 1 else "Flower's logs"
        see = f" (see {where} for {what})" if logs else " (and Flower's logs could not be kept)"
        if unkept:  # a full disk, say: the summary most likely failed the same way
            see = f", and Flower's logs could not be kept: {unkept}"
        print(f"run {name} did not complete: it wrote no summary{see}", file=sys.stderr)
        return EXIT_FAILED
    if summary["status"] != "completed":
        print(
            f"run {name} did not complete (status {summary['status']}): {summary['error']}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for log in logs:  # only kept when something went wrong
        (run_dir / log).unlink(missing_ok=True)
    print(f"run {name} completed: {run_dir / SUMMARY_FILE}")
    return 0
