"""``inputs.json``: what a run reads, taken when it starts, so that a resume notices a change.

config.json holds a trace's path, never its content; a trace edited between a kill and the
rerun would otherwise train the rounds before and after the kill on different links. A new
run records the identity of every input (:func:`write_inputs`); a resume recomputes it and
refuses any difference, naming the file (:func:`check_inputs`). What is recorded, how far a
listing goes and what is not checked: docs/run-directory.md#rerunning-a-run-name.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adc_flwr.config import RunConfig
from adc_flwr.data.identity import MAX_FILES, bundled_file, file_stats, sha256_file, source_roots
from adc_flwr.model.vit import HUB_PREFIX
from adc_flwr.population.profile_csv import read_trace
from adc_flwr.run.files import RunDirError, _read_json, atomic_write_json
from adc_flwr.run.input_root import InputPathError, check_input, local_inputs
from adc_flwr.run.run_dir import INPUTS_FILE, RunDir

log = logging.getLogger("adc_flwr")
FORMAT = 1
ABOUT = (
    "The identity of every input this run reads, taken when it started; a resume recomputes "
    "it and refuses any change (docs/run-directory.md). sha256: a file's content (profile-"
    "trace, link traces, a local model's files, the digits file bundled with scikit-learn, "
    "by a name that is not its install path). files: [size, mtime_ns] of each dataset "
    "file (not hashed). capped: the listing stopped after `limit` files in sorted order, and "
    "only those are checked. hub: a hub dataset or model, recorded by name (and the revision "
    "in the local cache, when known), not checked: which revision the hub serves cannot be "
    "told offline."
)
Entry = dict[str, Any]


def run_inputs(
    cfg: RunConfig, *, limit: int = MAX_FILES, known_traces: Iterable[str] = ()
) -> list[Entry]:
    """The identity of ``cfg``'s inputs: profile-trace, its link traces, model, dataset.

    ``known_traces``: link traces to identify when the profile-trace cannot be read now
    (its own entry then tells the change)."""
    entries: list[Entry] = []
    local = dict(local_inputs(cfg))  # as the loaders resolve them
    if "profile-trace" in local:
        entries.append(_hashed("profile-trace", local["profile-trace"]))
        try:
            profiles = read_trace(cfg.profile_trace)
            named = [t.path for p in profiles for t in (p.uplink_trace, p.downlink_trace) if t]
        except (ValueError, OSError):  # ProfileError, or a path refused: validation says
            named = list(known_traces)
        entries.extend(_hashed("link trace", Path(path)) for path in dict.fromkeys(named))
    if "model" in local:  # a local checkpoint directory, hf:<folder> included
        entries.append(_listing("model", local["model"], limit, hashed=True))
    elif cfg.model.startswith(HUB_PREFIX):
        model = cfg.model
        entries.append(_hub("model", model, _cached_revision(model[len(HUB_PREFIX) :].strip())))
    if bundled := bundled_file(cfg.dataset):  # by content under a stable name
        name, path = bundled
        entries.append({"role": "dataset", "path": name, "sha256": sha256_file(path)})
    elif (roots := source_roots(cfg.dataset, cfg.data_dir)) is not None:
        entries.extend(_listing("dataset", root, limit, hashed=False) for root in roots)
    else:
        entries.append(_hub("dataset", cfg.dataset.strip(), None))
    return entries


def write_inputs(run_dir: RunDir, cfg: RunConfig) -> None:
    """Write ``inputs.json`` for a new run (atomic), before it trains."""
    record = {"format": FORMAT, "about": ABOUT, "limit": MAX_FILES, "inputs": run_inputs(cfg)}
    atomic_write_json(run_dir.path / INPUTS_FILE, record)


def read_inputs(run_dir: RunDir) -> dict[str, Any] | None:
    """The stored record, or None for a run directory written before runs recorded their
    inputs; :class:`RunDirError` naming the file when it is not one this project wrote."""
    path = run_dir.path / INPUTS_FILE
    record = _read_json(path)
    if record is None:
        return None
    entries = record.get("inputs")
    if (
        record.get("format") != FORMAT
        or not isinstance(record.get("limit", MAX_FILES), int)
        or not isinstance(entries, list)
        or not all(isinstance(e, dict) and isinstance(e.get("role"), str) for e in entries)
    ):
        raise RunDirError(
            f"{path} is not an inputs file this project wrote (format {FORMAT}); restore it, "
            "or start a new run name"
        )
    return record


def input_change(record: Mapping[str, Any], cfg: RunConfig) -> str | None:
    """The first difference between the stored inputs and ``cfg``'s now (one phrase naming
    the file and what changed), or None."""
    old = {_key(e): e for e in record["inputs"]}
    traces = [e["path"] for e in record["inputs"] if e["role"] == "link trace" and "path" in e]
    new = {
        _key(e): e
        for e in run_inputs(cfg, limit=record.get("limit", MAX_FILES), known_traces=traces)
    }
    for key in [*old, *(k for k in new if k not in old)]:
        if what := _difference(old.get(key), new.get(key)):
            return what
    return None


def check_inputs(run_dir: RunDir, cfg: RunConfig, *, finished: bool = False) -> None:
    """Before a resume: :class:`RunDirError` when an input changed since the run started; a
    warning when the directory predates ``inputs.json``. ``finished``: the run is not redone,
    so a change is only a warning (its results stand for the recorded inputs)."""
    record = read_inputs(run_dir)
    if record is None:
        if not finished:
            log.warning(
                "warning: %s has no %s (it was started before runs recorded their inputs): "
                "its inputs could not be checked; resuming it as it is",
                run_dir.path,
                INPUTS_FILE,
            )
        return
    change = input_change(record, cfg)
    if change is None:
        return
    if finished:
        log.warning(
            "warning: %s: input changed since the run ran: %s; its results are of the inputs "
            "%s records; start a new run name to use the new ones",
            run_dir.path,
            change,
            INPUTS_FILE,
        )
        return
    raise RunDirError(
        f"{run_dir.path}: input changed since the run started: {change}; start a new run "
        "name to use it (or restore the file to resume)"
    )


# ---- identities -------------------------------------------------------------------------


def _hashed(role: str, path: Path) -> Entry:
    """A file by content; one the input root refuses (validation names it) is not read."""
    try:
        resolved = check_input(path)
    except InputPathError:
        return {"role": role, "path": str(Path(path).expanduser().absolute()), "sha256": None}
    return {"role": role, "path": str(resolved), "sha256": sha256_file(resolved)}


def _listing(role: str, root: Path, limit: int, *, hashed: bool) -> Entry:
    root = root.expanduser().resolve()
    stats, capped = file_stats(root, limit)
    files: dict[str, Any] = {}
    for path, size, mtime in stats:
        rel = "." if path == root else path.relative_to(root).as_posix()
        files[rel] = sha256_file(path) if hashed else [size, mtime]
    return {"role": role, "path": str(root), "files": files, "capped": capped}


def _hub(role: str, name: str, revision: str | None) -> Entry:
    return {"role": role, "hub": name, "revision": revision, "checked": False}


def _cached_revision(source: str) -> str | None:
    """The commit of the hub model's snapshot in the local cache, when it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # an id the hub library refuses: the load reports it
        return None
    parts = Path(found).parts if isinstance(found, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


# ---- differences ------------------------------------------------------------------------


def _key(entry: Entry) -> tuple[str, str]:
    return entry["role"], str(entry.get("path", entry.get("hub")))


def _difference(old: Entry | None, new: Entry | None) -> str | None:
    if old is None or new is None:
        role, where = _key(new or old or {})
        return f"{role} {where} ({'no longer read' if new is None else 'not read before'})"
    if "hub" in old:
        return None  # recorded, not checked (see ABOUT)
    if "files" in old:
        return _listing_difference(old, new)
    if old.get("sha256") != new.get("sha256"):
        return f"{old['role']} {old['path']} ({_change(old.get('sha256'), new.get('sha256'))})"
    return None


def _listing_difference(old: Entry, new: Entry) -> str | None:
    before, after = old["files"], new.get("files", {})
    changed = sorted(
        rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)
    )
    if not changed:
        return None
    rel = changed[0]
    where = old["path"] if rel == "." else f"{old['path']}/{rel}"
    if rel not in before:
        what = "added since"
    elif rel not in after:
        what = "removed since"
    else:
        what = _change(before[rel], after[rel])
    more = f"; {len(changed) - 1} more file(s) of it differ too" if len(changed) > 1 else ""
    return f"{old['role']} {where} ({what}){more}"


def _change(old: Any, new: Any) -> str:
    """``sha256 ab12.. -> cd34..``, ``size 10 -> 12 bytes`` or ``modified at ...``."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) == 2:
        if old[0] != new[0]:
            return f"size {old[0]} -> {new[0]} bytes"
        return f"modified: mtime {_when(old[1])} -> {_when(new[1])}"
    short = [f"{h[:12]}.." if isinstance(h, str) else "missing or unreadable" for h in (old, new)]
    return f"sha256 {short[0]} -> {short[1]}"


def _when(ns: Any) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(int(ns) / 1e9, datetime.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ns)
    return moment.isoformat(timespec="microseconds")
