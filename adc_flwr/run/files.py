"""Whole-file writes that a crash cannot tear, and reads that name a damaged file.

Every whole-file write goes to a temporary file in the same directory, is fsynced, then
``os.replace``d over the target: a crash or a serialisation error leaves the old file intact.
A file that cannot be read back raises :class:`RunDirError` naming the file and what to do;
nothing is deleted or rewritten to get past it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class RunDirError(RuntimeError):
    """A run directory's file is damaged or does not fit the run; says which and what to do."""


def os_reason(exc: OSError) -> str:
    """The OS's reason with its errno name: ``No space left on device (ENOSPC)``."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def write_error(path: Path, exc: OSError) -> RunDirError:
    """One line naming the file and the OS's reason (a full disk, a read-only folder, ...)."""
    return RunDirError(
        f"{path} cannot be written: {os_reason(exc)}. Nothing half-written was left; free the "
        "space or fix the folder's permissions and rerun the same command to resume"
    )


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0o666 & ~umask), as ``open``
    would give it: run files are shared like any other. Read without changing the umask."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux: set and restore
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then replace ``path``;
    the file gets the mode the umask gives new files. An ``OSError`` becomes a
    :class:`RunDirError` naming ``path``; the old file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
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
    """``torch.save`` into memory, then replace ``path`` atomically: a failed save changes
    nothing, and a full disk is the OS's error naming the file, not torch's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunDirError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(
            f"{path} is damaged (not valid JSON: {exc}). Restore it, or move the run "
            "directory away (or pick another run-name) to start over"
        ) from exc
    if not isinstance(value, dict):
        raise RunDirError(f"{path} does not hold a JSON object; restore it or move it away")
    return value


def write_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Named numeric arrays as a compressed ``.npz``, atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` ({} when absent). Object arrays are refused, not unpickled;
    a file that is no ``.npz`` is a :class:`RunDirError` naming it."""
    if not path.exists():
        return {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("one array, not a file of named arrays")
        with loaded as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise RunDirError(
            f"{path} is damaged or not a file of numeric arrays ({type(exc).__name__}: {exc}); "
            "restore it or move it away"
        ) from exc
