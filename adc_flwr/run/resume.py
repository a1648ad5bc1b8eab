"""Whether a run directory is new, resumable or finished, and whether it holds this run.

One decision, shared by the ServerApp, the sweep runner and ``scripts/flwr_run.sh`` (through
``simulations.preflight``), so a rerun under an existing name always gets the same answer:

- ``finished``: the same config, completed: nothing to do.
- ``resume``: the same config, with progress (a checkpoint or metric rows): continue it.
- ``new``: nothing there, or a run that failed before training anything (no progress), whose
  name it may take over.
- another config with progress: refused with the keys that differ (old and new value).
- no ``config.json`` but files a run writes, or files no run writes: someone else's folder,
  refused (:func:`check_ours`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adc_flwr.config import RunConfig
from adc_flwr.run.files import RunDirError
from adc_flwr.run.run_dir import RunDir

NEW, RESUME, FINISHED = "new", "resume", "finished"
# keys that do not change what a run computes: a moved results directory (or a run name given
# where it was derived) is the same run, waiting longer for clients is how to resume one
# that failed on timeouts, and a run started on a GPU may resume on a CPU (or another GPU)
IGNORED_KEYS = ("out-dir", "run-name", "step-timeout", "start-timeout", "min-nodes", "device")


def config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs.

    A key absent from one side counts as its :class:`RunConfig` default: a run directory
    written before a key existed (``precision``, say) ran with what its default does, so it
    is the same run as one asking for the default. A key that is no run-config key at all
    shows as None.
    """
    defaults = RunConfig().to_run_config()
    keys = sorted((set(stored) | set(wanted)) - set(IGNORED_KEYS))
    old = {key: stored.get(key, defaults.get(key)) for key in keys}
    new = {key: wanted.get(key, defaults.get(key)) for key in keys}
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in keys if old[key] != new[key]]


def has_progress(run_dir: RunDir, completed: bool) -> bool:
    """Whether anything was trained there: a checkpoint, a step row or (``completed``) a
    completed summary."""
    return completed or run_dir.checkpoint_path.exists() or run_dir.step_rows() > 0


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_ours(run_dir: RunDir) -> None:
    """Raise :class:`RunDirError`, naming the files, when ``run_dir`` is someone else's
    folder: its ``config.json`` names no run-config key (a model's, say), or it has none but
    holds files no run writes, or files a run writes only after its ``config.json``
    (docs/run-directory.md#rerunning-a-run-name). The lock and Flower's logs, which a
    launcher leaves before its run starts, are a run's."""
    if run_dir.config_path.exists():
        stored = run_dir.read_config()
        if not isinstance(stored, dict) or not set(stored) & set(RunConfig().to_run_config()):
            raise RunDirError(
                f"{run_dir.path}/config.json is not a run's config (it names no run-config "
                "key): the folder is someone else's; pick another run-name or out-dir"
            )
        return
    if foreign := run_dir.foreign_files():
        raise RunDirError(
            f"{run_dir.path} holds files that are not a run's ({_listed(foreign)}) and no "
            "config.json: it is not a run directory; pick another run-name or out-dir"
        )
    if theirs := run_dir.results_without_config():
        raise RunDirError(
            f"{run_dir.path} holds {_listed(theirs)} but no config.json, which a run writes "
            "before any of them: they are not this run's and are left as they are; pick "
            "another run-name or out-dir, or move them away to start over"
        )


def run_state(run_dir: RunDir, config: Mapping[str, Any]) -> str:
    """:data:`NEW`, :data:`RESUME` or :data:`FINISHED` for running ``config`` in ``run_dir``.

    Raises :class:`RunDirError` when the directory holds another run that trained something,
    or is someone else's folder (:func:`check_ours`, never taken over); damaged files raise
    from the readers.
    """
    check_ours(run_dir)
    stored = run_dir.read_config()
    if stored is None:  # nothing there but a launcher's lock or logs
        return NEW
    completed = (run_dir.read_summary() or {}).get("status") == "completed"
    progress = has_progress(run_dir, completed)
    differences = config_differences(stored, config)
    if differences:
        if progress:
            raise RunDirError(
                f"{run_dir.path} holds a run with another config ({'; '.join(differences)}); "
                "pick another run-name or out-dir, or move that directory away to start over"
            )
        return NEW  # it failed at start-up: its name is free
    if completed:
        return FINISHED
    return RESUME if progress else NEW


def resumable_checkpoint(run_dir: RunDir) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start from round 1), once metrics.csv is checked
    to still hold every row the checkpoint saw written. Raises :class:`RunDirError`, before
    anything is rewritten, when a file is damaged or rows are missing."""
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is None:
        return None
    rounds_done = int(checkpoint["round"])
    expected = int(checkpoint["metrics_rows"])
    if (found := run_dir.metric_rows(up_to_round=rounds_done)) != expected:
        raise RunDirError(
            f"{run_dir.metrics_path} holds {found} complete rows of rounds 1-{rounds_done}, "
            f"but {expected} had been written when checkpoint.pt was taken: it was truncated "
            "or edited. Restore it, or move the run directory away to start over"
        )
    return checkpoint
