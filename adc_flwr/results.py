"""The run directory (DESIGN.md section 5): what a run leaves behind, crash-safe and resumable.

``<out-dir>/<run-name>/`` holds:

- ``config.json``: the resolved, validated run config (atomic write).
- ``metrics.csv``: append-only, one row per step or evaluation, with the fixed columns
  :data:`METRIC_COLUMNS` (``kind`` is ``step`` or ``eval``; a value a row does not have,
  or NaN, is a blank cell). Each row is flushed when written; :meth:`RunDir.flush` fsyncs
  (call it at least once per round, before the checkpoint). ``sim_time_s`` is the simulated
  clock (:mod:`adc_flwr.clock`); the ``fed_accuracy_*`` columns are the federated
  evaluation over the round's clients (mean, 10th percentile, worst), on eval rows.
- ``clients.csv``: append-only, one row per sampled client per round
  (:data:`CLIENT_COLUMNS`), written at the round's end; resumed like ``metrics.csv``.
- ``profiles.csv``: each partition's link and device (:mod:`adc_flwr.profiles`).
- ``partitions.csv``: each partition's train samples per class (before any held-out share).
- ``summary.json`` (atomic write), built with :func:`make_summary`. Keys, always present:
  ``status`` (``completed``, ``failed`` or ``interrupted``), ``stop_reason`` (why a
  completed run stopped: ``"num-server-rounds"`` or ``"budget-mb"``; null otherwise),
  ``error`` (what failed or interrupted it; null when completed), ``rounds``,
  ``test_accuracy``, ``test_loss``, ``bytes_up_act``, ``bytes_up_targets``,
  ``bytes_down_grad``, ``bytes_model_sync``, ``compression_ratio``, ``wall_time_s`` (null
  when unknown), ``sim_time_s``, plus any extra metrics the caller adds. Non-finite floats
  are written as null, since JSON has no NaN.
- ``checkpoint.pt``: whatever the strategy needs to resume (``torch.save``, atomic), plus
  how many metric rows had been written when it was taken.

Resume (:mod:`adc_flwr.resume` decides whether a directory is new, resumable or finished):
load the checkpoint, check that :meth:`RunDir.metric_rows` up to its round equals the count
it saved, then call :meth:`RunDir.truncate_metrics_after` with its round (0 without one), so
rows of the unfinished round are dropped and not duplicated when it is redone.

Every whole-file write goes to a temporary file in the same directory, is fsynced, then
``os.replace``d over the target: a crash or a serialisation error leaves the old file intact.
A file that cannot be read back (truncated by hand, a full disk) raises :class:`RunDirError`
naming the file and what to do; nothing is deleted or rewritten to get past it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from adc_flwr.round_table import RoundTable, RunDirError

if TYPE_CHECKING:
    import pandas as pd

METRIC_COLUMNS: tuple[str, ...] = (
    "kind",
    "round",
    "step",
    "train_loss",
    "test_accuracy",
    "test_loss",
    "bytes_up_act",
    "bytes_up_targets",
    "bytes_down_grad",
    "bytes_model_sync",
    "compression_ratio",
    "wall_time_s",
    "sim_time_s",
    "fed_accuracy_mean",
    "fed_accuracy_p10",
    "fed_accuracy_min",
)
ROW_KINDS = ("step", "eval")
SUMMARY_METRICS = (
    "rounds",
    "test_accuracy",
    "test_loss",
    "bytes_up_act",
    "bytes_up_targets",
    "bytes_down_grad",
    "bytes_model_sync",
    "compression_ratio",
    "wall_time_s",
    "sim_time_s",
)
SUMMARY_STATUSES = ("completed", "failed", "interrupted")
# clients.csv: one row per sampled client per round (bytes of this client in this round;
# simulated seconds; outcome: finished or why it was dropped; federated evaluation if any)
CLIENT_COLUMNS: tuple[str, ...] = (
    "round",
    "partition",
    "profile",
    "xi",
    "bytes_up",
    "bytes_down",
    "bytes_model_sync",
    "compute_s",
    "transfer_s",
    "steps",
    "late_exchanges",
    "outcome",
    "fed_accuracy",
    "fed_examples",
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CLIENTS_FILE = "clients.csv"
PROFILES_FILE = "profiles.csv"
PARTITIONS_FILE = "partitions.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"


# ---- atomic writes --------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then replace ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (not possible on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that readers see the old or the new file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    """numpy / torch scalars and arrays become plain numbers and lists; anything else fails."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Serialise fully first (NaN/inf as null), then replace ``path`` atomically."""
    plain = json.loads(json.dumps(obj, default=_json_default))  # numpy/torch -> Python
    text = json.dumps(_finite_or_none(plain), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` into a temp file, then replace ``path``; a failed save changes nothing."""
    _atomic_write(path, lambda f: torch.save(obj, f))


# ---- run directory --------------------------------------------------------------------


def _check_kind(row: Mapping[str, Any]) -> None:
    if row.get("kind") not in ROW_KINDS:
        raise ValueError(f"metric row kind {row.get('kind')!r} is not one of {ROW_KINDS}")


class RunDir:
    """One run's directory: config, append-only metrics, summary and checkpoint."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)  # created by the first write, not by looking
        self.metrics = RoundTable(
            self.path / METRICS_FILE, METRIC_COLUMNS, atomic_write_text, _check_kind
        )
        self.clients = RoundTable(self.path / CLIENTS_FILE, CLIENT_COLUMNS, atomic_write_text)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.metrics.path

    @property
    def clients_path(self) -> Path:
        return self.clients.path

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    # ---- config -----------------------------------------------------------------

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        """Write the resolved run config as ``config.json``."""
        atomic_write_json(self.config_path, dict(cfg))

    def read_config(self) -> dict[str, Any] | None:
        """The stored config, or None before the first write."""
        return _read_json(self.config_path)

    # ---- metrics and the per-client table ---------------------------------------

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one metrics row (``kind`` required, missing columns blank)."""
        self.metrics.append([row])

    def append_clients(self, rows: list[Mapping[str, Any]]) -> None:
        """Append one round's rows of ``clients.csv``."""
        self.clients.append(rows)

    def flush(self) -> None:
        """fsync both tables so that rows written so far survive a machine crash."""
        self.metrics.flush()
        self.clients.flush()

    def close(self) -> None:
        """fsync and close both tables (a later append reopens them)."""
        self.metrics.close()
        self.clients.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_metrics(self) -> pd.DataFrame:
        """All metric rows so far (an empty frame with the columns before the first row)."""
        return self.metrics.read()

    def read_clients(self) -> pd.DataFrame:
        """All ``clients.csv`` rows so far."""
        return self.clients.read()

    def truncate_metrics_after(self, server_round: int) -> int:
        """Drop rows of rounds after ``server_round`` from both tables, and torn last lines
        (a crash mid-row); kept rows stay byte for byte. Returns the metrics lines dropped."""
        self.clients.truncate_after(server_round)
        return self.metrics.truncate_after(server_round)

    def step_rows(self) -> int:
        """Complete ``kind=step`` rows in metrics.csv: training steps recorded so far."""
        return self.metrics.count(prefix=b"step,")

    def metric_rows(self, up_to_round: int | None = None) -> int:
        """Complete data rows in metrics.csv (a torn last line does not count), of rounds up
        to ``up_to_round`` when given."""
        return self.metrics.count(up_to_round)

    # ---- summary ----------------------------------------------------------------

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically (build it with :func:`make_summary`)."""
        atomic_write_json(self.summary_path, dict(summary))

    def read_summary(self) -> dict[str, Any] | None:
        """The stored summary, or None if the run never finished or failed."""
        return _read_json(self.summary_path)

    def is_finished(self) -> bool:
        """Whether a completed summary exists, so the run must not be redone."""
        summary = self.read_summary()
        return summary is not None and summary.get("status") == "completed"

    # ---- checkpoint -------------------------------------------------------------

    def save_checkpoint(self, obj: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` atomically (after :meth:`flush`, so metrics lead it), with
        the number of metric rows written so far (``metrics_rows``) for the resume check."""
        self.flush()
        atomic_torch_save(self.checkpoint_path, {**obj, "metrics_rows": self.metric_rows()})

    def load_checkpoint(self) -> Any | None:
        """The stored checkpoint, or None.

        Loaded with ``weights_only=True`` when it holds only tensors and plain containers;
        otherwise (e.g. numpy RNG state) it falls back to full unpickling, which is safe here
        because this run wrote the file itself.
        """
        if not self.checkpoint_path.exists():
            return None
        try:
            # on the CPU: a GPU run resumes anywhere; load_state_dict moves weights back
            cpu = torch.device("cpu")
            try:
                return torch.load(self.checkpoint_path, map_location=cpu, weights_only=True)
            except pickle.UnpicklingError:
                return torch.load(self.checkpoint_path, map_location=cpu, weights_only=False)
        except Exception as exc:
            raise RunDirError(
                f"{self.checkpoint_path} cannot be read ({type(exc).__name__}: {exc}). Restore "
                "it, or move the run directory away (or pick another run-name) to start over"
            ) from exc


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(
            f"{path} is damaged (not valid JSON: {exc}). Restore it, or move the run "
            "directory away (or pick another run-name) to start over"
        ) from exc
    if not isinstance(value, dict):
        raise RunDirError(f"{path} does not hold a JSON object; restore it or move it away")
    return value


def make_summary(
    status: str,
    stop_reason: str | None = None,
    error: str | None = None,
    **metrics: Any,
) -> dict[str, Any]:
    """A summary with every documented key; metrics not given are None.

    A completed run must say why it stopped; a failed one must say what failed.
    """
    if status not in SUMMARY_STATUSES:
        raise ValueError(f"summary status {status!r} is not one of {SUMMARY_STATUSES}")
    if status == "completed" and not stop_reason:
        raise ValueError("a completed run's summary needs a stop_reason")
    if status != "completed" and not error:
        raise ValueError(f"a {status} run's summary needs an error saying why")
    summary: dict[str, Any] = {"status": status, "stop_reason": stop_reason, "error": error}
    summary.update({key: metrics.pop(key, None) for key in SUMMARY_METRICS})
    summary.update(metrics)
    return summary
