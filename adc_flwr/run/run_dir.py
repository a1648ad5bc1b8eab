"""The run directory (docs/design.md section 5): what a run leaves behind, crash-safe and resumable.

``<out-dir>/<run-name>/`` holds:

- ``config.json``: the resolved, validated run config (atomic write).
- ``metrics.csv``: append-only, one row per step or evaluation, with the fixed columns
  :data:`METRIC_COLUMNS` (``kind`` is ``step`` or ``eval``; a value a row does not have,
  or NaN, is a blank cell). Each row is flushed when written; :meth:`RunDir.flush` fsyncs
  (call it at least once per round, before the checkpoint). ``sim_time_s`` is the simulated
  clock (:mod:`adc_flwr.population.clock`); the ``fed_accuracy_*`` columns are the federated
  evaluation over the round's clients (mean, 10th percentile, worst), on eval rows.
- ``clients.csv``: append-only, one row per sampled client per round
  (:data:`CLIENT_COLUMNS`), written at the round's end; resumed like ``metrics.csv``.
- ``privacy.csv``: append-only, two rows per audited round (``privacy-eval``), the columns
  of :data:`~adc_flwr.privacy.columns.PRIVACY_COLUMNS`; resumed like ``metrics.csv``.
- ``privacy_images.npz``: the last audit's example images, uint8 arrays (atomic write; read
  with ``allow_pickle=False``).
- ``profiles.csv``: each partition's link and device (:mod:`adc_flwr.population.profiles`).
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
- ``inputs.json``: the identity of every file the run reads, taken when it started
  (:mod:`adc_flwr.run.inputs`); a resume compares it.

Resume (:mod:`adc_flwr.run.resume` decides whether a directory is new, resumable or finished):
load the checkpoint, check that :meth:`RunDir.metric_rows` up to its round equals the count
it saved, then call :meth:`RunDir.truncate_metrics_after` with its round (0 without one), so
rows of the unfinished round are dropped and not duplicated when it is redone.

Every whole-file write goes to a temporary file in the same directory, is fsynced, then
``os.replace``d over the target: a crash or a serialisation error leaves the old file intact.
A file that cannot be read back (truncated by hand, a full disk) raises :class:`RunDirError`
naming the file and what to do; nothing is deleted or rewritten to get past it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adc_flwr.privacy.columns import PRIVACY_COLUMNS
from adc_flwr.run.files import (
    RunDirError,
    _read_json,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_arrays,
    write_arrays,
)
from adc_flwr.run.table import RoundTable

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# the traffic so far, on every metrics row and in the summary (``Traffic.as_dict()``)
TRAFFIC_COLUMNS: tuple[str, ...] = (
    "bytes_up_act",
    "bytes_up_targets",
    "bytes_down_grad",
    "bytes_model_sync",
    "compression_ratio",
)
METRIC_COLUMNS: tuple[str, ...] = (
    "kind",
    "round",
    "step",
    "train_loss",
    "test_accuracy",
    "test_loss",
    *TRAFFIC_COLUMNS,
    "wall_time_s",
    "sim_time_s",
    "fed_accuracy_mean",
    "fed_accuracy_p10",
    "fed_accuracy_min",
)
ROW_KINDS = ("step", "eval")
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
    "energy_compute_j",
    "energy_radio_j",
    "outcome",
    "fed_accuracy",
    "fed_examples",
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CLIENTS_FILE = "clients.csv"
PRIVACY_FILE = "privacy.csv"
PRIVACY_IMAGES_FILE = "privacy_images.npz"
PROFILES_FILE = "profiles.csv"
PARTITIONS_FILE = "partitions.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
INPUTS_FILE = "inputs.json"  # what the run reads (adc_flwr.run.inputs)
LOCK_FILE = ".lock"  # the run's one writer (adc_flwr.run.lock)
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    CLIENTS_FILE,
    PRIVACY_FILE,
    PRIVACY_IMAGES_FILE,
    PROFILES_FILE,
    PARTITIONS_FILE,
    SUMMARY_FILE,
    CHECKPOINT_FILE,
    INPUTS_FILE,
    LOCK_FILE,
)
# Flower's logs, which the launchers keep in the run directory when a run did not complete
LOG_FILE = re.compile(r"(superlink|supernode-\d+)\.log")


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
        self.privacy = RoundTable(self.path / PRIVACY_FILE, PRIVACY_COLUMNS, atomic_write_text)

    def foreign_files(self) -> list[str]:
        """Names in the directory that no run writes (sorted): someone else's files. A temp
        file of an interrupted atomic write (``.<name>.*.tmp``) is a run's."""
        return self._names(lambda entry: not entry.is_file() or entry.name not in RUN_FILES)

    def results_without_config(self) -> list[str]:
        """Run files here (sorted) that a run writes only after ``config.json``: all but the
        lock and Flower's logs, which a launcher leaves before its run starts. Without a
        ``config.json`` they are someone else's (docs/run-directory.md)."""
        return self._names(
            lambda entry: entry.is_file() and entry.name in RUN_FILES and entry.name != LOCK_FILE
        )

    def _names(self, keep: Callable[[Path], bool]) -> list[str]:
        """Names of the entries here that ``keep`` accepts (sorted), never a file that is
        Flower's log or the temp file of an interrupted atomic write (a run's own)."""
        if not self.path.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.path.iterdir()
            if keep(entry)
            and not (
                entry.is_file()
                and (
                    LOG_FILE.fullmatch(entry.name)
                    or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
                )
            )
        )

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.metrics.path

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

    def append_privacy(self, server_round: int, rows: list[Mapping[str, Any]]) -> None:
        """Write the audit of ``server_round`` to ``privacy.csv``, replacing any rows of that
        round or later (an audit after the last checkpoint that is being redone), and fsync."""
        self.privacy.truncate_after(server_round - 1)
        self.privacy.append(rows)
        self.privacy.flush()

    def flush(self) -> None:
        """fsync the tables so that rows written so far survive a machine crash."""
        for table in (self.metrics, self.clients, self.privacy):
            table.flush()

    def close(self) -> None:
        """fsync and close the tables (a later append reopens them)."""
        for table in (self.metrics, self.clients, self.privacy):
            table.close()

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

    def write_privacy_images(self, images: Mapping[str, np.ndarray]) -> None:
        """Write the audit's example images as ``privacy_images.npz`` (atomic)."""
        write_arrays(self.path / PRIVACY_IMAGES_FILE, images)

    def read_privacy_images(self) -> dict[str, np.ndarray]:
        """The last audit's example images ({} before any); never unpickles."""
        return read_arrays(self.path / PRIVACY_IMAGES_FILE)

    def read_privacy(self) -> pd.DataFrame:
        """All ``privacy.csv`` rows so far."""
        return self.privacy.read()

    def truncate_metrics_after(self, server_round: int) -> int:
        """Drop rows of rounds after ``server_round`` from the tables, and torn last lines
        (a crash mid-row); kept rows stay byte for byte. Returns the metrics lines dropped."""
        self.clients.truncate_after(server_round)
        self.privacy.truncate_after(server_round)
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

    # ---- checkpoint -------------------------------------------------------------

    def save_checkpoint(self, obj: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` atomically (after :meth:`flush`, so metrics lead it), with
        the number of metric rows written so far (``metrics_rows``) for the resume check."""
        self.flush()
        atomic_torch_save(self.checkpoint_path, {**obj, "metrics_rows": self.metric_rows()})

    def load_checkpoint(self) -> Any | None:
        """The stored checkpoint, or None.

        A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)``
        only (tensors and plain containers; the strategy stores nothing else). A file that
        loader refuses, a planted pickle among them, is an error naming it, and nothing in it
        runs.
        """
        if not self.checkpoint_path.exists():
            return None
        try:
            # on the CPU: a GPU run resumes anywhere; load_state_dict moves weights back
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            what = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
            raise RunDirError(
                f"{self.checkpoint_path} is not a checkpoint this project wrote: it holds "
                f"Python objects that are not plain data, and it was not loaded ({what}). "
                "Move the run directory away (or pick another run-name) to start over"
            ) from exc
        except Exception as exc:
            raise RunDirError(
                f"{self.checkpoint_path} cannot be read ({type(exc).__name__}: {exc}). Restore "
                "it, or move the run directory away (or pick another run-name) to start over"
            ) from exc
