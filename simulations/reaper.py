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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

GRACE_S = 5.0  # SIGTERM first; whatever still runs after this gets SIGKILL
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def carrying(variable: str, value: str) -> list[psutil.Process]:
    """Processes whose environment has ``variable=value`` (those this user may read): every
    process a launcher started, however Flower detached it, inherits the launcher's token."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(variable) == value:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def kill_carrying(variable: str, value: str, rounds: int = 20) -> int:
    """SIGKILL every process carrying ``variable=value`` until none is left (a process may
    start others while its siblings die); how many were killed."""
    killed = 0
    for _ in range(rounds):
        procs = carrying(variable, value)
        if not procs:
            break
        _terminate(procs, kill=True)
        psutil.wait_procs(procs, timeout=1.0)
        killed += len(procs)
    return killed


def raise_interrupted(signum: int, _frame: object) -> None:
    """Signal handler, one-shot: later signals are ignored, so nothing can cut the clean-up
    short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def handle_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` from now on."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_interrupted)


def block_stop_signals() -> set[signal.Signals]:
    """Hold SIGINT, SIGTERM and SIGHUP pending; returns the signal mask it replaced.

    Once it returns, no stop signal's handler runs until they are unblocked:
    ``pthread_sigmask`` runs the handlers of signals that came just before it, so an
    :class:`Interrupted` they raise comes out of this call, never later. (The signal mask is
    the calling thread's: the launchers start no threads.)
    """
    return signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def restore_signal_mask(mask: set[signal.Signals]) -> None:
    """Put back a mask :func:`block_stop_signals` returned; a stop signal held pending
    meanwhile runs its handler in this call."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_stop_signals(mask: set[signal.Signals]) -> None:
    """Stop signals are ignored from now on (the run is over: its clean-up and verdict go
    on, whatever comes), those held pending meanwhile too; then ``mask`` is put back."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a pending signal set to SIG_IGN is dropped
    restore_signal_mask(mask)


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
