"""What the launcher (``scripts/flwr_run.sh``) asks before and after a ``flwr run``.

- :func:`check`: parses ``--run-config`` and ``--federation-config`` exactly as ``flwr run``
  does (Flower's own parser), runs :func:`adc_flwr.run.validation.validate_run` with the number
  of SuperNodes and asks :func:`adc_flwr.run.resume.run_state` about the run directory, so
  every error is one line, before any Flower or Ray process starts.
  :func:`check_apart` runs it in a child process.
- :func:`pinned_run_config`: the run config ``flwr run`` gets, with where to write.
- :func:`fresh_summary`: the verdict this invocation's ServerApp wrote, never an older one.
- :func:`mark_interrupted`: an ``interrupted`` summary for a run stopped from outside.
- :func:`verdict`: the exit status (and the one line that explains it) of a finished run.

``scripts/deploy_local.sh`` (:mod:`simulations.deploy`) asks the same.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from adc_flwr.config import ConfigError
from adc_flwr.run.resume import run_state
from adc_flwr.run.run_dir import SUMMARY_FILE, RunDir
from simulations.reaper import Interrupted

DEFAULT_SUPERNODES = 2  # flwr's own default since 1.32
EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # as flwr's parse_config_args


def parse_pairs(text: str, what: str) -> dict:
    """``key=value`` pairs as ``flwr run`` reads them (TOML values)."""
    from flwr.common.config import parse_config_args

    keys = [key for key, _ in PAIR.findall(text)]
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise ConfigError(f"{what}: key(s) {', '.join(map(repr, twice))} given more than once")
    try:
        return parse_config_args([text]) if text.strip() else {}
    except Exception as exc:  # click.ClickException, ValueError
        raise ConfigError(f"{what} {text!r} cannot be parsed: {exc}") from None


def toml_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` parses it back (a TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" in value:
            raise ConfigError(f"run-config value {value!r}: a quote cannot be passed to flwr run")
        return f"'{value}'"
    if isinstance(value, float):
        return repr(value)  # keeps the dot: 1.0 stays a float
    return str(value)


def format_pairs(pairs: dict[str, Any]) -> str:
    """``key=value`` pairs that :func:`parse_pairs` (and ``flwr run``) read back as given."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in pairs.items())


def check(run_config: str, federation_config: str, out_dir: str, run_name: str) -> str:
    """The run directory's state (``new``, ``resume`` or ``finished``) for a valid config;
    raises :class:`ConfigError` or :class:`RunDirError` with the one-line reason."""
    from adc_flwr.run.validation import validate_run

    federation = parse_pairs(federation_config, "--federation-config")
    nodes = federation.get("num-supernodes", DEFAULT_SUPERNODES)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"federation key 'num-supernodes' = {nodes!r}: expected an int >= 1")
    pairs = parse_pairs(run_config, "--run-config") | {"out-dir": out_dir, "run-name": run_name}
    cfg = validate_run(pairs, num_partitions=nodes)
    return run_state(RunDir(cfg.run_dir), cfg.to_run_config())


def check_apart(run_config: str, federation_config: str, out_dir: str, run_name: str) -> str:
    """:func:`check` in a child process: the data and model it builds to validate the run
    leave with it, instead of staying in the launcher for the whole run (0.5 GB for the
    default run)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check, run_config, federation_config, out_dir, run_name).result()


def run_location(pairs: dict[str, Any], default_out_dir: Path) -> tuple[str, str]:
    """``(out_dir, run_name)``: ``out-dir`` / ``run-name`` given in the run config win over
    ``OUT_DIR`` / ``RUN_NAME`` in the environment, as in ``flwr run``; the name defaults to
    the time."""
    out_dir = str(pairs.get("out-dir") or os.environ.get("OUT_DIR") or default_out_dir)
    run_name = str(
        pairs.get("run-name") or os.environ.get("RUN_NAME") or time.strftime("run-%Y%m%d-%H%M%S")
    )
    return out_dir, run_name


def pinned_run_config(run_config: str, run_dir: Path) -> str:
    """The run config (a TOML file or pairs) as pairs, with ``out-dir`` and ``run-name``
    set to ``run_dir``: the ServerApp's working directory is not ours, so it gets absolute
    paths."""
    pairs = parse_pairs(run_config, "--run-config") | {
        "out-dir": str(run_dir.parent),
        "run-name": run_dir.name,
    }
    return format_pairs(pairs)


def fresh_summary(run_dir: Path, since_ns: int) -> dict | None:
    """The summary written after ``since_ns``, or None (absent, or left by an earlier run)."""
    path = run_dir / "summary.json"
    if not path.exists() or path.stat().st_mtime_ns <= since_ns:
        return None
    return RunDir(run_dir).read_summary()


def mark_interrupted(run_dir: Path, since_ns: int, interrupted_ns: int, reason: str) -> None:
    """Write an ``interrupted`` summary from the last checkpoint, unless the run never
    started (no config.json) or this invocation's run wrote its verdict before the
    interrupt (between ``since_ns`` and ``interrupted_ns``): a ``failed`` written after it
    is the interrupt's doing (its clients were killed under it) and is replaced."""
    from adc_flwr.run.summary import summary_from_checkpoint

    path = run_dir / "summary.json"
    if not (run_dir / "config.json").exists():
        return
    if path.exists() and since_ns < path.stat().st_mtime_ns < interrupted_ns:
        return
    folder = RunDir(run_dir)
    folder.write_summary(summary_from_checkpoint(folder, "interrupted", reason))


def keep_logs(
    sources: Mapping[str, Path], run_dir: Path, since_ns: int, interrupted: bool
) -> list[str]:
    """Copy Flower's logs (name in the run directory -> file) there; the names kept.

    When the run was not interrupted and wrote no summary (``flwr run`` failed before the
    ServerApp made the run directory, say), the directory is made here: the verdict names
    these copies, and the originals go with the private directory.
    """
    summary = run_dir / SUMMARY_FILE
    kept = []
    try:
        if not interrupted and not (summary.exists() and summary.stat().st_mtime_ns > since_ns):
            run_dir.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            if source.exists() and run_dir.exists():
                shutil.copyfile(source, run_dir / name)
                kept.append(name)
    except OSError as exc:
        print(f"warning: Flower's logs could not be kept in {run_dir}: {exc}", file=sys.stderr)
    return kept


def verdict(
    run_dir: Path, name: str, since_ns: int, interrupted: Interrupted | None, logs: Sequence[str]
) -> int:
    """The exit status of run ``name``, started by this invocation at ``since_ns``, judged by
    the summary it wrote, with one line saying why (stdout when completed, else stderr).

    ``interrupted`` says a signal stopped it; ``logs`` are the Flower log files copied into
    ``run_dir`` (none: they could not be kept): named when no summary was written, removed
    when the run completed.
    """
    summary = fresh_summary(run_dir, since_ns)
    if interrupted is not None and (summary or {}).get("status") != "completed":
        reason = f"interrupted by {interrupted}"
        mark_interrupted(run_dir, since_ns, interrupted.at_ns, reason)
        print(f"run {name} {reason}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary is None:
        where = ", ".join(str(run_dir / log) for log in logs)
        what = "Flower's log" if len(logs) == 1 else "Flower's logs"
        see = f"see {where} for {what}" if logs else "and Flower's logs could not be kept"
        print(f"run {name} did not complete: it wrote no summary ({see})", file=sys.stderr)
        return EXIT_FAILED
    if summary["status"] != "completed":
        print(
            f"run {name} did not complete (status {summary['status']}): {summary['error']}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for log in logs:  # only kept when something went wrong
        (run_dir / log).unlink(missing_ok=True)
    print(f"run {name} completed: {run_dir / 'summary.json'}")
    return 0
