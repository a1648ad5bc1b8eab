"""Bytes of arrays as :mod:`adc_flwr.wire.codec` serialises them, computed without Flower.

The codec counts every array as its ``np.save`` bytes (the ``.npy`` header included) plus the
length of its record key, as Flower's ``ArrayRecord.count_bytes()`` does. The sizes here
follow that rule from a dtype and a shape alone, so compressors can size their packets
before encoding one. This module imports numpy only: the compressors use it and must import
and run without Flower (``benchmarks/bench_gpu.py`` runs them on a machine with torch only).
``tests/wire/test_codec.py`` checks them against real records.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np

ACT_NAME = "act"
"""Tensor name of a full, uncompressed activation (what method ``none`` sends)."""

FLOAT_TAG = "f"
"""Record-key prefix of a floating tensor at ``float32``/``float16`` (``f:<name>``)."""


def npy_header_nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Length of the ``.npy`` header ``np.save`` writes for a C-ordered array."""
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    buf = BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # header too long for format 1.0; np.save then uses 2.0
        buf = BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return len(buf.getvalue())


def uncompressed_act_nbytes(batch: int, tokens: int, hidden: int, name: str = ACT_NAME) -> int:
    """Exact activation bytes of an uncompressed ``(batch, tokens, hidden)`` float32 packet.

    This is the reference of ``compression_ratio``: what method ``none`` at float32 puts on
    the wire through :func:`adc_flwr.wire.codec.packet_to_record` (header and key included),
    computed without allocating the activation.
    """
    if min(batch, tokens, hidden) < 0:
        raise ValueError(f"negative activation shape {(batch, tokens, hidden)}")
    dtype = np.dtype(np.float32)
    shape = (int(batch), int(tokens), int(hidden))
    data = batch * tokens * hidden * dtype.itemsize
    return npy_header_nbytes(dtype, shape) + data + len(f"{FLOAT_TAG}:{name}")
