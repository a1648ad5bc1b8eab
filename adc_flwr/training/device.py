"""Where tensors live (run-config key ``device``) and at what precision forwards run
(``precision``).

``device`` places the server's back and the central evaluation: ``auto`` (CUDA when torch
sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. A ClientApp under ``flwr run``
runs where the federation puts it: on the GPU Ray gave its actor
(``client-resources-num-gpus`` > 0, a fraction lets clients share one), else on the CPU,
unless ``device = "cpu"`` keeps it there. Outside Ray (in-process sweeps, tests) clients
share the server's device.

Only :func:`adc_flwr.run.validation.validate_run` checks that the device exists (``RunConfig``
checks the spelling only): a config is rebuilt in every ClientApp process, where Ray may
hide the GPUs on purpose.

``precision = "bf16"`` runs the front and back forwards under ``torch.autocast``; the
compressors, K-means, the CLS-attention row that ranks tokens (autocast is switched off for
it), the loss and the wire stay float32, so a client's replay of a packet reuses the same
plan on the same activations (docs/devices.md). :func:`check_precision`
refuses bf16 on a CUDA device without bfloat16.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

import torch

from adc_flwr.config import DEVICE_HELP, PRECISIONS, ConfigError, device_spelling


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names on this machine; :class:`ConfigError` naming the key
    when it asks for a GPU that is not there."""
    if problem := device_spelling(spec):
        raise ConfigError(f"run-config key 'device' = {spec!r}: {problem}")
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if not available:
        build = f"torch {torch.__version__}" + (
            "" if torch.version.cuda else ", a build without CUDA"
        )
        raise ConfigError(
            f"run-config key 'device' = {spec!r}: no CUDA device is available here ({build}); "
            f"allowed values are {DEVICE_HELP}; use 'auto' or 'cpu' on this machine"
        )
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"run-config key 'device' = {spec!r}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}; allowed values are {DEVICE_HELP}"
        )
    return torch.device("cuda", index)


def client_device(spec: str) -> torch.device:
    """Where this process's ClientApp runs: ``cpu`` when asked; in a Ray actor, the GPU Ray
    assigned it if any (Ray sets ``CUDA_VISIBLE_DEVICES``, so it is ``cuda``), else the CPU;
    outside Ray, as :func:`resolve_device`."""
    if spec == "cpu":
        return torch.device("cpu")
    gpus = ray_gpu_ids()
    if gpus is None:
        return resolve_device(spec)
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


def ray_gpu_ids() -> list[str] | None:
    """The GPU ids Ray gave this worker process, or None outside a Ray worker (the driver,
    which hosts the ServerApp, included). Ray is never imported here."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:
            return None
        return [str(i) for i in context.get_accelerator_ids().get("GPU", [])]
    except AttributeError:  # another Ray API: treat as outside Ray
        return None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without any)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``; the same tensor objects where they already are."""
    return {k: t if t.device == device else t.to(device) for k, t in tensors.items()}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``precision = "bf16"``; nothing at all for fp32, so
    fp32 runs take exactly the code path they always took."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(
            f"run-config key 'precision' = {precision!r}: allowed values are "
            f"{', '.join(PRECISIONS)}"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_precision(device: torch.device, precision: str) -> None:
    """:class:`ConfigError` naming the key when ``precision`` cannot run on ``device``: bf16 on
    a CUDA device without bfloat16 (``torch.cuda.is_bf16_supported()``, the check
    ``torch.autocast`` itself makes when a forward starts)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"run-config key 'precision' = 'bf16': the CUDA device here ({device}) does not "
            f"support bfloat16; allowed values are {', '.join(PRECISIONS)}; use 'fp32' on this "
            "machine"
        )
