"""What the launcher (``scripts/flwr_run.sh``) asks before and after a ``flwr run``.

- :func:`check`: parses ``--run-config`` and ``--federation-config`` exactly as ``flwr run``
  does (Flower's own parser), runs :func:`adc_flwr.validation.validate_run` with the number
  of SuperNodes and asks :func:`adc_flwr.resume.run_state` about the run directory, so
  every error is one line, before any Flower or Ray process starts.
- :func:`fresh_summary`: the verdict this invocation's ServerApp wrote, never an older one.
- :func:`mark_interrupted`: an ``interrupted`` summary for a run stopped from outside.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adc_flwr.config import ConfigError
from adc_flwr.results import RunDir
from adc_flwr.resume import run_state

DEFAULT_SUPERNODES = 2  # flwr's own default since 1.32
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
    from adc_flwr.validation import validate_run

    federation = parse_pairs(federation_config, "--federation-config")
    nodes = federation.get("num-supernodes", DEFAULT_SUPERNODES)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"federation key 'num-supernodes' = {nodes!r}: expected an int >= 1")
    pairs = parse_pairs(run_config, "--run-config") | {"out-dir": out_dir, "run-name": run_name}
    cfg = validate_run(pairs, num_partitions=nodes)
    return run_state(RunDir(cfg.run_dir), cfg.to_run_config())


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
    from strategies.experiment import summary_from_checkpoint

    path = run_dir / "summary.json"
    if not (run_dir / "config.json").exists():
        return
    if path.exists() and since_ns < path.stat().st_mtime_ns < interrupted_ns:
        return
    folder = RunDir(run_dir)
    folder.write_summary(summary_from_checkpoint(folder, "interrupted", reason))
