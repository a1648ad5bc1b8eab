"""One writer per run directory: an exclusive lock on ``<run dir>/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its holder's
process dies, ``kill -9`` included: a crash never leaves a stale lock. Its holder writes who
it is into the file (PID, host, start time and a token), so that a refused run can say who
holds the directory, and the next holder can tell the processes of the previous one.

A launcher (``simulations.supervise``) holds the lock for the whole run and gives its token
to every process it starts (:data:`TOKEN_ENV`); the ServerApp under it finds the lock held
with its own token and writes under it. Any other writer (a second launcher, a bare
``flwr run``, an in-process run) takes the lock itself or is refused with :class:`RunBusy`.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from adc_flwr.run.files import RunDirError, file_mode, write_error
from adc_flwr.run.run_dir import LOCK_FILE

TOKEN_ENV = "ADC_RUN_TOKEN"  # the launcher's token, in the environment of what it starts


class RunBusy(RunDirError):
    """Another process holds the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory's lock."""

    pid: int
    host: str
    started: str  # ISO time
    token: str

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host} since {self.started}"


class RunLock:
    """The lock of the run directory ``run_dir`` (made when the lock is taken)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self.previous: Holder | None = None  # who held it before this process took it

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> Holder | None:
        """Who holds it now or held it last (None: nobody ever, or the file is not ours)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "null")
            return Holder(**info) if isinstance(info, dict) else None
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, token: str) -> None:
        """Take the lock for this process, writing ``token`` as the holder's; raise
        :class:`RunBusy` naming the holder when another process holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.busy() from None
        self.previous = self.holder()
        me = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            token=token,
        )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
        except OSError as exc:  # a full disk: the lock is given back, the file named
            os.close(fd)
            raise write_error(self.path, exc) from exc
        self._fd = fd

    def held_elsewhere(self) -> Holder | None:
        """The holder when another process holds the lock now, else None (it is free, or
        this process holds it). Takes and gives back the lock to find out."""
        if self.held or not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder() or Holder(0, "?", "?", "")
        finally:
            os.close(fd)  # closing gives a shared lock back
        return None

    def busy(self) -> RunBusy:
        holder = self.holder()
        who = f"by {holder}" if holder else "by another process"
        return RunBusy(
            f"{self.path.parent} is in use {who}: one run writes a run directory at a time. "
            "Wait for it, or pick another run-name or out-dir"
        )

    def release(self) -> None:
        """Give the lock back (the holder's record stays, for the next holder to read)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
