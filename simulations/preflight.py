"""What :mod:`simulations.supervise` asks before it starts any Flower process.

- :func:`check`: parses ``--run-config`` and ``--federation-config`` exactly as ``flwr run``
  does (Flower's own parser), runs :func:`adc_flwr.run.validation.validate_run` with the
  number of SuperNodes and asks :func:`adc_flwr.run.resume.run_state` about the run
  directory (and :func:`adc_flwr.run.inputs.check_inputs` whether a resume's inputs
  changed), so every error is one line, before any Flower or Ray process starts.
  :func:`check_apart` runs it in a child process.
- :func:`run_location`: where the run writes, from the config or the environment.
- :func:`pinned_run_config`: the run config ``flwr run`` gets, with where to write.
- :func:`format_pairs`: run-config pairs that ``flwr run`` parses back as given.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from adc_flwr.config import ConfigError
from adc_flwr.run.inputs import check_inputs
from adc_flwr.run.resume import FINISHED, RESUME, resumable_checkpoint, run_state
from adc_flwr.run.run_dir import RunDir

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
    from adc_flwr.run.validation import validate_run

    federation = parse_pairs(federation_config, "--federation-config")
    check_federation(federation)
    nodes = federation.get("num-supernodes", DEFAULT_SUPERNODES)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"federation key 'num-supernodes' = {nodes!r}: expected an int >= 1")
    pairs = parse_pairs(run_config, "--run-config") | {"out-dir": out_dir, "run-name": run_name}
    cfg = validate_run(pairs, num_supernodes=nodes)
    run_dir = RunDir(cfg.run_dir)
    state = run_state(run_dir, cfg.to_run_config())
    if state in (RESUME, FINISHED):  # changed inputs: a resume is refused, a finished run told
        check_inputs(run_dir, cfg, finished=state == FINISHED)
    if state == RESUME:  # a damaged checkpoint or metrics.csv: now, not once Flower runs
        resumable_checkpoint(run_dir)
    return state


def check_federation(federation: Mapping[str, Any]) -> None:
    """Every ``--federation-config`` key is one ``flwr run`` knows, of its type (Flower's
    ``SimulationConfig``); :class:`ConfigError` naming the key otherwise."""
    from flwr.proto.federation_config_pb2 import SimulationConfig

    fields = {f.name.replace("_", "-"): f.name for f in SimulationConfig.DESCRIPTOR.fields}
    for key, value in federation.items():
        if key not in fields:
            raise ConfigError(
                f"federation key {key!r} is unknown; known keys: {', '.join(sorted(fields))}"
            )
        try:
            setattr(SimulationConfig(), fields[key], value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"federation key {key!r} = {value!r}: {exc}") from None


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
