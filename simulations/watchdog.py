"""Ends a run whose launcher died without cleaning up (``kill -9``, its whole process group
included).

:func:`simulations.supervise.supervise` starts this in a session of its own, so a signal to
the launcher's process group does not reach it, and keeps its standard input open: when the
launcher ends normally it writes ``done`` first; when it dies, the pipe closes with nothing
written. Then every process carrying the launcher's token in its environment (all that the
run started, however Flower detached them) is killed, and with them every process whose
command line or environment names the launcher's private directory: the run's Ray session
lives there (``ray/session_*``), and its raylet starts agents again without the token. The
killing goes on until none came back for a few seconds; then the private directory is
removed, so no orphan goes on writing the run directory beside a rerun.

    python -m simulations.watchdog TOKEN PRIVATE_DIR      (started by the launcher only)
"""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from adc_flwr.run.lock import TOKEN_ENV
from simulations.reaper import kill_until_quiet, leftovers

DONE = b"done"


def main(argv: Sequence[str] | None = None) -> int:
    token, home = list(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are the launcher's
        signal.signal(sig, signal.SIG_IGN)
    said = sys.stdin.buffer.read()  # until the launcher closes the pipe, or dies
    if said.strip() == DONE:
        return 0
    end_run(token, Path(home))
    return 0


def end_run(token: str, home: Path) -> int:
    """Kill the run's processes (its token's and those naming ``home``) until none came
    back for :data:`~simulations.reaper.QUIET_S`, then remove ``home``; how many were killed."""
    killed = kill_until_quiet(leftovers((TOKEN_ENV, token), [home]))
    shutil.rmtree(home, ignore_errors=True)
    return killed


if __name__ == "__main__":
    sys.exit(main())
