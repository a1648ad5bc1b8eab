"""Client state that survives between messages: ``context.state``, the only place it can.

Tensors are kept as ONE flat float32 array plus names and shapes: ``context.state`` is
serialised on every message, and one array instead of hundreds (each with its own .npy header
to write and parse) saves the client about 20 ms a message. This is local state, not traffic:
nothing here is counted as bytes on the wire.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context


def store_tensors(context: Context, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Keep float32 ``tensors`` in ``context.state[key]`` as one flat array, with their
    names and shapes in ``context.state[key + ".layout"]``."""
    parts = [t.detach().reshape(-1).float() for t in tensors.values()]
    flat = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float32)
    shapes = [list(t.shape) for t in tensors.values()]
    context.state[key] = ArrayRecord({"flat": Array(flat)})
    context.state[f"{key}.layout"] = ConfigRecord(
        {
            "names": list(tensors),
            "ndims": [len(s) for s in shapes],
            "dims": [d for s in shapes for d in s],
        }
    )


def load_tensors(context: Context, key: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`store_tensors`."""
    flat = torch.from_numpy(context.state[key]["flat"].numpy())
    layout = context.state[f"{key}.layout"]
    dims = iter(layout["dims"])
    out, start = {}, 0
    for name, ndim in zip(layout["names"], layout["ndims"], strict=True):
        shape = [next(dims) for _ in range(ndim)]
        numel = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[start : start + numel].reshape(shape)
        start += numel
    return out
