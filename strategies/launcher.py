"""``flwr run .`` on a private SuperLink, judged truthfully, leaving nothing behind.

``scripts/flwr_run.sh`` runs this module. ``flwr run`` exits 0 when the run failed, starts a
SuperLink that outlives it, and the simulation process and Ray outlive the SuperLink; so:

1. the config is checked first (:func:`strategies.preflight.check`): a bad value or a run
   directory holding another run is one line on stderr, before any Flower or Ray process;
   a finished run is reported and not redone;
2. the run gets its own Flower home, Ray temp dir and two free ports, so runs side by side
   never share a SuperLink;
3. this process becomes a child subreaper (Linux), so every process the run starts stays
   its descendant even after its parent exits; when the run ends, fails or is interrupted
   (SIGINT, SIGTERM, SIGHUP), each of them is ended by PID (SIGTERM, then SIGKILL after a
   grace period: some Ray agents ignore SIGTERM) and the private directories are removed;
4. the verdict is the ``summary.json`` this invocation's ServerApp wrote; an interrupted run
   gets an ``interrupted`` summary (resumable). Exit status: 0 only for ``completed``.

    OUT_DIR=... RUN_NAME=... python -m strategies.launcher [RUN_CONFIG] [FEDERATION_CONFIG]
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from adc_flwr.config import ConfigError
from adc_flwr.results import RunDirError
from adc_flwr.resume import FINISHED
from strategies.preflight import check, format_pairs, fresh_summary, mark_interrupted, parse_pairs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"
GRACE_S = 5.0  # SIGTERM first; whatever still runs after this gets SIGKILL
EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130
PR_SET_CHILD_SUBREAPER = 36


class Interrupted(Exception):
    """A signal asked the run to stop; ``at_ns`` is when (time.time_ns())."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.at_ns = time.time_ns()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def stop_descendants(grace_s: float = GRACE_S) -> None:
    """End every descendant of this process by PID: SIGTERM, then SIGKILL after ``grace_s``."""
    me = psutil.Process()
    procs = me.children(recursive=True)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # a process may have started children while being stopped: take them along
    alive += [p for p in me.children(recursive=True) if p not in alive]
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=grace_s)


def _raise_interrupted(signum: int, _frame: object) -> None:
    """One-shot: later signals are ignored, so nothing can cut the clean-up short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def flwr_command(run_config: str, federation: str, run_dir: Path) -> list[str]:
    """``flwr run`` with the run config as parsed (a TOML file or pairs) plus where to write."""
    pairs = parse_pairs(run_config, "--run-config") | {
        "out-dir": str(run_dir.parent),
        "run-name": run_dir.name,
    }
    return [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        format_pairs(pairs),
        "--federation-config",
        federation,
    ]


def checked_apart(run_config: str, federation: str, out_dir: str, run_name: str) -> str:
    """:func:`check` in a child process: the data and model it builds to validate the run
    leave with it, instead of staying in this process for the whole run (0.5 GB for the
    default run)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check, run_config, federation, out_dir, run_name).result()


def launch(run_config: str, federation: str, out_dir: str, run_name: str) -> int:
    """Run one ``flwr run`` as described above; returns the exit status."""
    run_dir = Path(out_dir).expanduser().resolve() / run_name
    try:
        state = checked_apart(run_config, federation, str(run_dir.parent), run_name)
        command = flwr_command(run_config, federation, run_dir)
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if state == FINISHED:
        print(f"run {run_name} already completed: {run_dir / 'summary.json'}")
        return 0
    if not become_subreaper():
        print("warning: not a child subreaper; a process Flower detaches may survive the run")
    interrupted: Interrupted | None = None
    since = time.time_ns()
    home = Path(tempfile.mkdtemp(prefix="adcf."))  # short: Ray's socket paths live below
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _raise_interrupted)
        http_port, control_port = free_ports(2)
        env = os.environ | {
            "FLWR_HOME": str(home),
            "RAY_TMPDIR": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
        subprocess.Popen(command, cwd=ROOT, env=env).wait()
    except Interrupted as exc:
        interrupted = exc
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up, whatever comes
        stop_descendants()
        log = home / "local-superlink" / "superlink.log"
        if log.exists() and run_dir.exists():
            shutil.copyfile(log, run_dir / "superlink.log")
        shutil.rmtree(home, ignore_errors=True)
    summary = fresh_summary(run_dir, since)
    if interrupted is not None and (summary or {}).get("status") != "completed":
        reason = f"interrupted by {interrupted}"
        mark_interrupted(run_dir, since, interrupted.at_ns, reason)
        print(f"run {run_name} {reason}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary is None:
        print(
            f"run {run_name} did not complete: it wrote no summary (see "
            f"{run_dir / 'superlink.log'} for Flower's log)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if summary["status"] != "completed":
        print(
            f"run {run_name} did not complete (status {summary['status']}): {summary['error']}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    (run_dir / "superlink.log").unlink(missing_ok=True)  # only kept when something went wrong
    print(f"run {run_name} completed: {run_dir / 'summary.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run_config = args[0] if args else ""
    federation = args[1] if len(args) > 1 and args[1].strip() else DEFAULT_FEDERATION
    try:
        pairs = parse_pairs(run_config, "--run-config")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    # out-dir / run-name given in the run config win over the environment, as in flwr run
    out_dir = str(pairs.get("out-dir") or os.environ.get("OUT_DIR") or ROOT / "results")
    run_name = str(
        pairs.get("run-name") or os.environ.get("RUN_NAME") or time.strftime("run-%Y%m%d-%H%M%S")
    )
    try:
        return launch(run_config, federation, out_dir, run_name)
    except (KeyboardInterrupt, Interrupted):  # during the checks: nothing was started
        return EXIT_INTERRUPTED
    except RunDirError as exc:  # the verdict could not be read or written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
