"""Packet <-> Flower ``ArrayRecord``: the one place where bytes on the wire are counted.

Every tensor that crosses the split point (activations and side information up, gradients
down, front weights both ways) goes through this module, and accounting reads its sizes from
:func:`record_nbytes` only, so a byte count can never disagree with what was serialised.

Record layout (every key says how to decode its array, so a record decodes on its own):

- ``"f:<name>"``: floating tensor at the wire dtype, ``float32`` or ``float16`` numpy.
- ``"b:<name>"``: floating tensor at ``bfloat16``, carried as its raw 16 bits (``uint16``
  numpy, since numpy has no bfloat16) and restored bit-exactly.
- ``"i:<name>"``: integer tensor (indices, codes) in the smallest integer dtype that holds
  its values: ``uint8/16/32/64`` when all values are >= 0, else ``int8/16/32/64``; ``bool``
  tensors (masks) stay numpy ``bool`` (1 byte each).
- ``"y"``: hard labels ``(B,)``; ``"ys"``: soft-label member counts ``(T, C)``. Either is in
  the smallest unsigned dtype holding its maximum. The key alone says whether targets are soft.

Sizes follow Flower's ``ArrayRecord.count_bytes()``: each array's ``np.save`` bytes (the
``.npy`` header included) plus the length of its key.

Devices: every tensor leaves through the CPU (``.cpu()`` before ``.numpy()``, whatever device
it was on); decoders build CPU tensors and move them to the ``device`` they are given (the
receiving worker's), before a received activation becomes a gradient leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from adc_flwr.config import WIRE_DTYPES
from adc_flwr.wire.sizes import FLOAT_TAG

if TYPE_CHECKING:  # only read here; importing it would pull in every compressor (cycle risk)
    from adc_flwr.compression.base import Compressor, Packet

_FLOAT, _BF16, _INT = FLOAT_TAG, "b", "i"
_HARD_TARGETS, _SOFT_TARGETS = "y", "ys"
_TARGET_KEYS = (_HARD_TARGETS, _SOFT_TARGETS)
_TORCH_FLOAT = {"float32": torch.float32, "float16": torch.float16}
_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)
_SIGNED = (np.int8, np.int16, np.int32, np.int64)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class ReceivedPacket:
    """A packet as the server sees it after decoding.

    Attributes:
        tensors: floating tensors as float32 leaves with ``requires_grad=True`` (the server
            runs its back on them and reads ``.grad``); integer tensors as int64, masks as bool.
        targets: int64 hard labels ``(B,)``, or ``(T, C)`` member counts when ``soft_targets``.
        soft_targets: whether ``targets`` holds soft-label counts.
        compressor: the sender's own compressor when clients compress differently
            (``adaptive-compression``); None: the run's.
    """

    tensors: dict[str, torch.Tensor]
    targets: torch.Tensor
    soft_targets: bool
    compressor: Compressor | None = None

    def grad_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors whose gradients go back to the client (the floating ones)."""
        return {k: t for k, t in self.tensors.items() if t.is_floating_point()}


# ---- encoding -------------------------------------------------------------------------


def _check_wire_dtype(wire_dtype: str) -> None:
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(
            f"wire-dtype {wire_dtype!r} is not supported; allowed values are "
            f"{', '.join(WIRE_DTYPES)}"
        )


def _smallest_int_dtype(lo: int, hi: int) -> type[np.integer]:
    """Unsigned when ``lo >= 0``, else signed; the narrowest width holding [lo, hi]."""
    for dtype in _UNSIGNED if lo >= 0 else _SIGNED:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"integer range [{lo}, {hi}] does not fit in 64 bits")


def _int_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.numpy().copy()
    if t.numel() == 0:
        return np.zeros(tuple(t.shape), dtype=np.uint8)
    lo, hi = int(t.min()), int(t.max())
    return t.numpy().astype(_smallest_int_dtype(lo, hi))


def _overflows_fp16(t: torch.Tensor, cast: torch.Tensor) -> bool:
    """Finite values that became inf; the cheap min/max test first (fp16 ops are slow on CPU)."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.float())
    if not max(-float(lo), float(hi)) > _FP16_MAX:
        return False
    return bool(torch.isinf(cast).any()) and bool(torch.isfinite(t).all())


def _float_to_numpy(t: torch.Tensor, wire_dtype: str, name: str) -> tuple[str, np.ndarray]:
    """(tag, array) for a floating tensor cast to the wire dtype."""
    t = t.detach().cpu()
    if wire_dtype == "bfloat16":
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return _BF16, bits.view(np.uint16)
    cast = t.to(_TORCH_FLOAT[wire_dtype])
    if wire_dtype == "float16" and _overflows_fp16(t, cast):
        raise ValueError(
            f"tensor {name!r} overflows wire-dtype float16 (|x| > 65504); "
            "use wire-dtype bfloat16 or float32"
        )
    return _FLOAT, cast.numpy()


def _put(record: ArrayRecord, key: str, array: np.ndarray) -> None:
    record[key] = Array(np.asarray(array, order="C"))  # C order: one header format; keeps 0-d


def _encode_tensors(
    record: ArrayRecord, tensors: Mapping[str, torch.Tensor], wire_dtype: str
) -> None:
    _check_wire_dtype(wire_dtype)
    for name, t in tensors.items():
        if t.is_complex():
            raise TypeError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if t.is_floating_point():
            tag, array = _float_to_numpy(t, wire_dtype, name)
        else:  # integers and bool masks
            tag, array = _INT, _int_to_numpy(t)
        _put(record, f"{tag}:{name}", array)


def packet_to_record(packet: Packet, wire_dtype: str) -> ArrayRecord:
    """Serialise what a client sends for one batch (the plan stays on the client).

    Tensors are detached here; the client keeps the graph and later calls
    ``torch.autograd.backward`` with the gradients that come back.
    """
    record = ArrayRecord()
    _encode_tensors(record, packet.tensors, wire_dtype)
    targets = packet.targets.detach().cpu()
    want_ndim = 2 if packet.soft_targets else 1
    if targets.is_floating_point() or targets.is_complex() or targets.ndim != want_ndim:
        kind = "soft-label counts (T, C)" if packet.soft_targets else "hard labels (B,)"
        raise ValueError(
            f"packet targets must be integer {kind}; got {targets.dtype} {tuple(targets.shape)}"
        )
    if targets.numel() and int(targets.min()) < 0:
        raise ValueError("packet targets must be non-negative (labels or member counts)")
    _put(record, _SOFT_TARGETS if packet.soft_targets else _HARD_TARGETS, _int_to_numpy(targets))
    return record


# ---- decoding -------------------------------------------------------------------------


def _split_key(key: str) -> tuple[str, str]:
    tag, sep, name = key.partition(":")
    if not sep or tag not in (_FLOAT, _BF16, _INT):
        raise ValueError(f"record key {key!r} is not one this codec writes")
    return tag, name


def _decode_array(tag: str, array: np.ndarray) -> torch.Tensor:
    """float32 for floating tags, int64 (or bool) for integers; always a fresh tensor."""
    if tag == _BF16:
        bits = torch.from_numpy(array.view(np.int16).copy())  # same 16 bits, owned memory
        return bits.view(torch.bfloat16).to(torch.float32)
    if tag == _FLOAT:
        return torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.astype(np.int64))


def _decode_tensors(
    record: ArrayRecord, skip: tuple[str, ...] = (), device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, arr in record.items():
        if key in skip:
            continue
        tag, name = _split_key(key)
        t = _decode_array(tag, arr.numpy())
        out[name] = t if device is None else t.to(device)
    return out


def record_to_packet(
    record: ArrayRecord, device: torch.device | str | None = None
) -> ReceivedPacket:
    """Decode a packet record on the server; floating tensors come back as grad-enabled leaves
    on ``device`` (None: the CPU), targets too."""
    present = [k for k in _TARGET_KEYS if k in record]
    if len(present) != 1:
        raise ValueError(f"a packet record holds exactly one of {_TARGET_KEYS}; found {present}")
    tensors = _decode_tensors(record, skip=_TARGET_KEYS, device=device)
    for t in tensors.values():
        if t.is_floating_point():
            t.requires_grad_(True)
    targets = torch.from_numpy(record[present[0]].numpy().astype(np.int64))
    if device is not None:
        targets = targets.to(device)
    return ReceivedPacket(tensors, targets, soft_targets=present[0] == _SOFT_TARGETS)


def grads_to_record(grads: Mapping[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """Serialise the gradients the server sends back (keyed like the packet's tensors)."""
    record = ArrayRecord()
    _encode_tensors(record, grads, wire_dtype)
    return record


def record_to_grads(
    record: ArrayRecord, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Decode gradients on the client as float32 tensors on ``device`` (None: the CPU)."""
    return _decode_tensors(record, device=device)


def state_to_record(
    state_dict: Mapping[str, torch.Tensor], wire_dtype: str = "float32"
) -> ArrayRecord:
    """Serialise model weights for sync; float32 by default so averaging loses nothing."""
    record = ArrayRecord()
    _encode_tensors(record, state_dict, wire_dtype)
    return record


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode weights: float32 for floating entries, int64/bool for integer buffers.

    ``nn.Module.load_state_dict`` copies into each parameter's own dtype.
    """
    return _decode_tensors(record)


# ---- sizes ----------------------------------------------------------------------------


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialised record: every array's ``np.save`` bytes plus its key."""
    return int(record.count_bytes())


def act_and_target_nbytes(record: ArrayRecord) -> tuple[int, int]:
    """(activation and side-information bytes, target bytes) of a packet record.

    The two parts sum to :func:`record_nbytes`; key bytes count with their array.
    """
    act = target = 0
    for key, arr in record.items():
        n = len(arr.data) + len(key)
        if key in _TARGET_KEYS:
            target += n
        else:
            act += n
    return act, target
