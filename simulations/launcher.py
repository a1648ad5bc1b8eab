"""``flwr run .`` on a private SuperLink, judged truthfully, leaving nothing behind.

``scripts/flwr_run.sh`` runs this module. ``flwr run`` exits 0 when the run failed, starts a
SuperLink that outlives it, and the simulation process and Ray outlive the SuperLink; so:

1. the config is checked first (:func:`simulations.preflight.check`): a bad value or a run
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

    OUT_DIR=... RUN_NAME=... python -m simulations.launcher [RUN_CONFIG] [FEDERATION_CONFIG]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adc_flwr.config import ConfigError
from adc_flwr.run.files import RunDirError
from adc_flwr.run.resume import FINISHED
from simulations.preflight import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    check_apart,
    keep_logs,
    parse_pairs,
    pinned_run_config,
    run_location,
    verdict,
)
from simulations.reaper import (
    Interrupted,
    become_subreaper,
    block_stop_signals,
    free_ports,
    handle_stop_signals,
    ignore_stop_signals,
    restore_signal_mask,
    stop_descendants,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"


def flwr_command(run_config: str, federation: str, run_dir: Path) -> list[str]:
    """``flwr run`` with the run config as parsed (a TOML file or pairs) plus where to write."""
    return [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        pinned_run_config(run_config, run_dir),
        "--federation-config",
        federation,
    ]


def launch(run_config: str, federation: str, out_dir: str, run_name: str) -> int:
    """Run one ``flwr run`` as described above; returns the exit status."""
    run_dir = Path(out_dir).expanduser().resolve() / run_name
    try:
        state = check_apart(run_config, federation, str(run_dir.parent), run_name)
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
    logs: list[str] = []
    # stop signals are held from here until their handler is in place, and again from the
    # end of the run to the end of the clean-up, so none can cut either short
    mask = block_stop_signals()
    home = Path(tempfile.mkdtemp(prefix="adcf."))  # short: Ray's socket paths live below
    try:
        try:
            handle_stop_signals()
            restore_signal_mask(mask)  # one that came meanwhile raises Interrupted here
            http_port, control_port = free_ports(2)
            env = os.environ | {
                "FLWR_HOME": str(home),
                "RAY_TMPDIR": str(home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            }
            subprocess.Popen(command, cwd=ROOT, env=env).wait()
        finally:
            block_stop_signals()  # or raises the Interrupted of one that came just before
    except Interrupted as exc:
        interrupted = exc
    finally:
        try:
            stop_descendants()
            log = {"superlink.log": home / "local-superlink" / "superlink.log"}
            logs = keep_logs(log, run_dir, since, interrupted is not None)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            ignore_stop_signals(mask)  # the verdict is written whatever comes
    return verdict(run_dir, run_name, since, interrupted, logs)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run_config = args[0] if args else ""
    federation = args[1] if len(args) > 1 and args[1].strip() else DEFAULT_FEDERATION
    try:
        pairs = parse_pairs(run_config, "--run-config")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    out_dir, run_name = run_location(pairs, ROOT / "results")
    try:
        return launch(run_config, federation, out_dir, run_name)
    except (KeyboardInterrupt, Interrupted):  # during the checks: nothing was started
        return EXIT_INTERRUPTED
    except RunDirError as exc:  # the verdict could not be read or written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
