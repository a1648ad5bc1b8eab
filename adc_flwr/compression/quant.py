"""Uniform b-bit quantisation of the split activation and of its gradient.

Each group of values (one token's ``d`` features by default, or the whole tensor) is mapped
to ``b``-bit codes ``q = round((x - zero) / scale)`` in ``[0, 2^b - 1]``, with ``zero`` the
group minimum and ``scale = (max - zero) / (2^b - 1)``; the receiver rebuilds
``zero + q·scale``, off by at most ``scale/2`` per element. ``zero`` is the float value of
code 0 (not an integer zero point), so no value is clipped.

Wire: ``codes`` are bit-packed into bytes, LSB first, each token's ``d`` codes in
``ceil(d·b/8)`` bytes: ``(B, n, ceil(d·b/8))`` uint8. Without packing the codec's
smallest-dtype rule would store every code in a whole uint8/uint16, so 3-bit codes would cost
8 bits. ``scale`` and ``zero`` are floats at the wire dtype, ``(B, n, 1)`` per token or
``(1, 1, 1)`` per tensor; they are rounded (zero down, scale up) to the wire dtype before the
codes are computed, so the server dequantises exactly what the client meant. The server knows
``b`` from the run config and reads ``d`` from the packed width; only when that is ambiguous
(``8·ceil(d·b/8) - d·b >= b``, never for ViT widths that are multiples of 8) a 0-d integer
``d`` travels too.

The codes carry no gradient: the server decodes them to a fresh leaf ``act`` (the
``_decode_with_leaves`` override), and the client's anchor ``act`` is the straight-through
``deq + (h - h.detach())`` (value exactly ``deq``), so the returned gradient reaches ``h``
unchanged. Gradients go back quantised the same way (``compress_grads``/``decompress_grads``).

Bytes per element: ``b/8`` for the codes plus, per token, ``2·4/d`` for float32 side
information, so the achieved ratio is about ``(b + 64/d)/32`` per token and ``b/32`` per
tensor (plus each array's ~128-byte ``.npy`` header).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.registry import register

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

GRANULARITIES = ("token", "tensor")
MAX_BITS = 16
_SIDE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def num_bits(compression: float, quant_bits: int = 0) -> int:
    """``b = quant_bits`` when > 0, else ``max(1, round(32·compression))`` capped at 16."""
    if quant_bits > 0:
        if quant_bits > MAX_BITS:
            raise ValueError(f"quant: 'quant-bits' = {quant_bits} must lie in [1, {MAX_BITS}]")
        return int(quant_bits)
    if not 0 < compression <= 1:
        raise ValueError(f"quant: 'compression' = {compression!r} must lie in (0, 1]")
    return min(MAX_BITS, max(1, round(32 * compression)))


# ---- bit packing ----------------------------------------------------------------------


def packed_width(m: int, bits: int) -> int:
    """Bytes that ``m`` codes of ``bits`` bits take: ``ceil(m·bits/8)``."""
    return -(-m * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., m)`` integer codes in ``[0, 2^bits)`` -> ``(..., ceil(m·bits/8))`` uint8.

    One LSB-first bit stream per row: bit ``j`` of code ``i`` is bit ``i·bits + j``.
    """
    *lead, m = codes.shape
    codes = codes.long()
    if bits % 8 == 0:  # whole bytes: little-endian, the same stream without a bit plane
        parts = [(codes >> (8 * k)) & 0xFF for k in range(bits // 8)]
        return torch.stack(parts, dim=-1).reshape(*lead, m * bits // 8).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device)
    planes = ((codes.unsqueeze(-1) >> shifts) & 1).to(torch.uint8)  # (..., m, bits)
    stream = planes.reshape(*lead, m * bits)  # (..., m·bits)
    width = packed_width(m, bits)
    stream = torch.nn.functional.pad(stream, (0, width * 8 - m * bits))  # (..., width·8)
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)  # (8,)
    return (stream.view(*lead, width, 8) * weights).sum(-1, dtype=torch.uint8)  # (..., width)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(..., ceil(m·bits/8))`` bytes -> ``(..., m)`` int64."""
    *lead, width = packed.shape
    if width != packed_width(m, bits):
        raise ValueError(f"quant: {width} bytes per row cannot hold {m} codes of {bits} bits")
    device = packed.device
    if bits % 8 == 0:
        parts = packed.long().view(*lead, m, bits // 8) << (
            8 * torch.arange(bits // 8, device=device)
        )
        return parts.sum(-1)
    # bit planes in uint8 (the codec hands bytes back as int64: 8x the memory otherwise)
    one_bit = torch.arange(8, dtype=torch.uint8, device=device)
    stream = (packed.to(torch.uint8).unsqueeze(-1) >> one_bit) & 1  # (..., w, 8)
    stream = stream.reshape(*lead, width * 8)[..., : m * bits].reshape(*lead, m, bits)
    weights = 1 << torch.arange(bits, device=device)  # (bits,) int64
    return (stream * weights).sum(-1)  # (..., m) int64


# ---- quantisation ---------------------------------------------------------------------


def _round_to(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` rounded up (or down) to a value ``dtype`` represents, returned in ``x.dtype``."""
    if x.dtype == dtype:
        return x
    y = x.to(dtype)
    wrong = y.to(x.dtype) < x if up else y.to(x.dtype) > x
    towards = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, towards), y).to(x.dtype)


@torch.no_grad()
def quantize(
    x: torch.Tensor, bits: int, granularity: str, side_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (B, n, d) -> codes (B, n, d) int64, scale and zero (B, n, 1) or (1, 1, 1).

    ``scale``/``zero`` hold values exactly representable in ``side_dtype`` (the wire dtype).
    """
    levels = (1 << bits) - 1
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if granularity == "token":
        lo = x.amin(dim=-1, keepdim=True)  # (B, n, 1)
        hi = x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.amin().view(1, 1, 1), x.amax().view(1, 1, 1)
    zero = _round_to(lo, side_dtype, up=False)
    scale = (hi - zero) / levels
    scale = _round_to(torch.where(scale > 0, scale, torch.ones_like(scale)), side_dtype, up=True)
    codes = ((x - zero) / scale).round_().clamp_(0, levels).long()  # (B, n, d)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``zero + codes·scale`` at the dtype of ``scale``."""
    return zero + codes.to(scale.dtype) * scale


@register
class QuantCompressor(Compressor):
    """Uniform ``b``-bit quantisation, per token or per tensor, both directions."""

    name = "quant"
    adaptive_overrides = ("quant-bits",)

    def __init__(
        self,
        num_classes: int,
        *,
        bits: int = 8,
        granularity: str = "token",
        wire_dtype: str = "float32",
    ) -> None:
        """``bits`` in [1, 16]; ``wire_dtype`` is what ``scale``/``zero`` travel as."""
        super().__init__(num_classes)
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"quant: 'quant-bits' = {bits!r} must lie in [1, {MAX_BITS}]")
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"quant: 'quant-granularity' = {granularity!r}; allowed values are {GRANULARITIES}"
            )
        if wire_dtype not in _SIDE_DTYPES:
            raise ValueError(f"quant: 'wire-dtype' = {wire_dtype!r} is not supported")
        self.bits = int(bits)
        self.granularity = granularity
        self.side_dtype = _SIDE_DTYPES[wire_dtype]

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> QuantCompressor:
        """``b`` from ``quant-bits`` or ``compression``; ``quant-granularity``; ``wire-dtype``."""
        return cls(
            num_classes,
            bits=num_bits(cfg.compression, cfg.quant_bits),
            granularity=cfg.quant_granularity,
            wire_dtype=cfg.wire_dtype,
        )

    def _to_wire(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``x`` (B, n, d) -> wire tensors and the dequantised ``(B, n, d)`` they decode to."""
        d = x.shape[-1]
        codes, scale, zero = quantize(x, self.bits, self.granularity, self.side_dtype)
        wire = {"codes": pack_bits(codes, self.bits), "scale": scale, "zero": zero}
        if (packed_width(d, self.bits) * 8) // self.bits != d:  # width alone is ambiguous
            wire["d"] = torch.tensor(d, dtype=torch.int64, device=x.device)
        return wire, dequantize(codes, scale, zero)

    # ---- client ---------------------------------------------------------------------

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Codes + scales on the wire; anchor ``act`` = straight-through dequantised ``h``.

        Deterministic rounding: the plan is empty and ``seed`` unused.
        """
        wire, deq = self._to_wire(h)
        anchor = deq.to(h.dtype) + (h - h.detach())  # value exactly deq, gradient identity
        return Packet(
            tensors=wire, targets=labels.long(), soft_targets=False, anchors={"act": anchor}
        )

    def decompress_grads(
        self, grads: dict[str, torch.Tensor], packet: Packet
    ) -> dict[str, torch.Tensor]:
        """Quantised gradient from the server -> float ``act`` gradient (B, n, d)."""
        return {"act": self._decode(grads)}

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unpack and dequantise: ``codes`` (B, n, w) + scales -> ``(B, n, d)``."""
        packed = tensors["codes"]
        d = int(tensors["d"]) if "d" in tensors else (packed.shape[-1] * 8) // self.bits
        codes = unpack_bits(packed, self.bits, d)  # (B, n, d)
        return dequantize(codes, tensors["scale"], tensors["zero"])

    def _decode_with_leaves(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The dequantised activation as a fresh leaf ``act``: its gradient goes back."""
        act = self._decode(tensors).detach().requires_grad_(True)  # (B, n, d)
        return act, {"act": act}

    def compress_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``act`` gradient quantised like the activation (codes + scales)."""
        wire, _ = self._to_wire(grads["act"])
        return wire
