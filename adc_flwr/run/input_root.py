"""Where a run may read its inputs: ``ADC_IN_ROOT`` pins them as ``ADC_OUT_ROOT`` pins the run
directory ([deployment](../../docs/deployment.md)), and no special file (FIFO, device,
socket) is read anywhere. The core's readers (profile-trace, link traces) and
:func:`adc_flwr.run.validation.check_in_root` (the paths of :func:`local_inputs`) call
:func:`check_input`."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

IN_ROOT_ENV = "ADC_IN_ROOT"  # set where the ServerApp runs, not by whoever submits a run
_SPECIAL = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class InputPathError(ValueError):
    """A path a run would read lies outside ``ADC_IN_ROOT`` or is a special file."""


def input_roots() -> list[Path]:
    """The folders (or files) a run may read, from ``ADC_IN_ROOT`` (several separated by
    ``os.pathsep``); empty when it is unset: no restriction."""
    raw = os.environ.get(IN_ROOT_ENV, "")
    return [Path(part).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip()]


def check_input(path: str | Path) -> Path:
    """``path`` resolved (links followed); :class:`InputPathError` when it lies outside every
    root of ``ADC_IN_ROOT`` (whether it exists or not) or is a FIFO, device or socket. A
    missing path inside the roots is left to the reader's own message."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        raise InputPathError(f"cannot be read ({exc})") from None
    roots = input_roots()
    if roots and not any(resolved.is_relative_to(root) for root in roots):
        raise InputPathError(
            f"{resolved} lies outside {IN_ROOT_ENV}={os.environ[IN_ROOT_ENV]}; this "
            "deployment reads inputs only there"
        )
    try:
        mode = resolved.stat().st_mode
    except OSError:
        return resolved
    if kind := _SPECIAL.get(stat.S_IFMT(mode)):
        raise InputPathError(f"{resolved} is {kind}, not a regular file or folder")
    return resolved


def local_inputs(cfg: RunConfig) -> list[tuple[str, Path]]:
    """The files and folders ``cfg``'s run-config keys name that a run reads, by key, as
    the loaders resolve them: profile-trace, data-dir (when set), the dataset's local path
    (:func:`adc_flwr.data.identity.dataset_path`) and a model that is a local folder (a
    preset name is not; ``hf:<folder>`` is). The one list behind the input root, the
    deployment's ``ADC_IN_ROOT`` and ``inputs.json``; link traces are checked where the
    profile-trace is read."""
    from adc_flwr.data.identity import dataset_path
    from adc_flwr.model.vit import HUB_PREFIX, PRESETS

    named: list[tuple[str, Path]] = []
    if cfg.profile_trace.strip():
        named.append(("profile-trace", Path(cfg.profile_trace).expanduser()))
    if cfg.data_dir.strip():
        named.append(("data-dir", Path(cfg.data_dir.strip()).expanduser()))
    if (path := dataset_path(cfg.dataset, cfg.data_dir)) is not None:
        named.append(("dataset", path))
    if cfg.model.startswith(HUB_PREFIX):  # from_pretrained reads a local folder first
        source = cfg.model[len(HUB_PREFIX) :].strip()
        if source and Path(source).is_dir():
            named.append(("model", Path(source)))
    elif cfg.model.strip() and cfg.model not in PRESETS:
        named.append(("model", Path(cfg.model)))
    return named
