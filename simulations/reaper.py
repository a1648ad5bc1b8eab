"""Keep every process a run starts within reach, and end each of them by PID.

Flower detaches what it starts (a SuperLink outlives ``flwr run``; SuperExec, ServerApp and
ClientApp processes outlive their parents), so the launchers (``simulations.launcher`` for
``flwr run`` on Ray, ``simulations.deploy`` for a local deployment) make themselves a child
subreaper: orphaned descendants are re-parented to them, and at the end each descendant is
ended by PID, never by name. Signals become :class:`Interrupted` so that the clean-up runs;
they are blocked while the private directory is made and from the end of the run to the end
of the clean-up, so that one landing there cannot cut it short.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from simulations.stopping import handle, one_shot

GRACE_S = 5.0  # SIGTERM first; whatever still runs after this gets SIGKILL
QUIET_S = 3.0  # a dead run's processes are gone when none came back for this long
POLL_S = 0.25
PR_SET_CHILD_SUBREAPER = 36


class Interrupted(Exception):
    """A signal asked the run to stop; ``at_ns`` is when (time.time_ns())."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.at_ns = time.time_ns()


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process, not to init (Linux only).

    Returns whether it worked; without it a SuperLink whose parent exited is out of reach.
    """
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets held until every port is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _terminate(procs: Iterable[psutil.Process], kill: bool = False) -> None:
    for proc in procs:
        try:
            proc.kill() if kill else proc.terminate()
        except psutil.NoSuchProcess:
            continue


def stop_descendants(grace_s: float = GRACE_S, spare: Iterable[int] = ()) -> None:
    """End every descendant of this process by PID (but those in ``spare``): SIGTERM, then
    SIGKILL after ``grace_s``."""
    me, spared = psutil.Process(), set(spare)
    procs = [p for p in me.children(recursive=True) if p.pid not in spared]
    _terminate(procs)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # a process may have started children while being stopped: take them along
    alive += [p for p in me.children(recursive=True) if p not in alive and p.pid not in spared]
    _terminate(alive, kill=True)
    psutil.wait_procs(alive, timeout=grace_s)


def leftovers(
    token: tuple[str, str] | None = None, homes: Iterable[Path] = ()
) -> Callable[[], list[psutil.Process]]:
    """A finder of a dead run's processes (those this user may read), in one pass: those whose
    environment has ``token`` (``(variable, value)``: every process a launcher started,
    however Flower detached it, inherits the launcher's token) or whose command line or
    environment names one of ``homes`` or a path below it (a Ray session's processes - raylet,
    GCS, the agents it starts again without the token - all name the session directory in the
    run's private directory)."""
    paths = {path for home in homes for path in (str(home), os.path.realpath(home))}
    pattern = re.compile("|".join(map(re.escape, paths)) + r"(?![\w.-])")  # not a longer name

    def found(proc: psutil.Process) -> bool:
        environ = proc.environ()
        if token is not None and environ.get(token[0]) == token[1]:
            return True
        return bool(paths) and any(
            pattern.search(word) for word in [*proc.cmdline(), *environ.values()]
        )

    def find() -> list[psutil.Process]:
        procs = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and found(proc):
                    procs.append(proc)
            except (psutil.Error, OSError):
                continue
        return procs

    return find


def kill_until_quiet(
    find: Callable[[], list[psutil.Process]], quiet_s: float = QUIET_S, limit_s: float = 60.0
) -> int:
    """SIGKILL what ``find`` returns until it has found nothing for ``quiet_s`` seconds
    since the last kill (a raylet may start its agents again while they die), for at most
    ``limit_s``; how many were killed. Returns at once when the first look finds nothing."""
    killed, last_kill, deadline = 0, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        procs = find()
        if procs:
            _terminate(procs, kill=True)
            psutil.wait_procs(procs, timeout=1.0)
            killed, last_kill = killed + len(procs), time.monotonic()
        elif not killed or time.monotonic() - last_kill >= quiet_s:
            break
        else:
            time.sleep(POLL_S)
    return killed


raise_interrupted = one_shot(Interrupted)  # later signals are ignored: see one_shot


def handle_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` from now on; a SIGHUP this
    process was started ignoring (``nohup``) stays ignored, SIGINT and SIGTERM never do (a
    CI script's ``cmd &`` starts its children with SIGINT ignored)."""
    handle(raise_interrupted, keep_ignored=(signal.SIGHUP,))


Watchdog = subprocess.Popen  # python -m simulations.watchdog, its stdin a pipe from here


def start_watchdog(token: str, home: Path) -> Watchdog:
    """:mod:`simulations.watchdog` in a session of its own, told through a pipe that this
    process is alive; it ends the run's processes if this one dies without saying done."""
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.watchdog", token, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def dismiss_watchdog(watchdog: Watchdog | None) -> None:
    """Tell the watchdog the run was cleaned up; it exits. Never raises."""
    if watchdog is None:
        return
    try:
        assert watchdog.stdin is not None
        watchdog.stdin.write(b"done")
        watchdog.stdin.close()
        watchdog.wait(timeout=GRACE_S)
    except (OSError, subprocess.TimeoutExpired):
        watchdog.kill()
