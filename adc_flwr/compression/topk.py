"""Top-K sparsification of the split activation (research/paper.md, "Baselines").

Per sample, the flattened ``(n·d)`` activation keeps its ``K`` largest-magnitude elements.
On the wire: ``values`` ``(B, K)`` at the wire dtype, ``idx`` ``(B, K)`` flat positions (the
codec stores them in the smallest integer dtype holding their range, e.g. uint16 for
``n·d <= 65536``) and ``shape`` ``(2,)`` = ``(n, d)``, which the server needs to scatter the
values back into zeros ``(B, n, d)``. The server's gradient comes back at the kept positions
only, ``(B, K)``: ``values`` is the tensor it refers to, and autograd through ``gather``
puts it back at ``h``'s kept elements (zero elsewhere). Hard labels.

The knob ``compression`` is the fraction of the uncompressed float32 activation bytes to
send. Per sample a kept element costs ``4 + index_bytes`` bytes (float32 value + index, the
index at the width the codec uses for ``n·d - 1``), so::

    K = max(1, floor(compression · 4·n·d / (4 + index_bytes)))   (at most n·d)

e.g. n·d = 3200 (uint16 indices): K = floor(compression · 3200 · 4/6). Per-packet extras
(one ``.npy`` header of about 128 bytes and the key per array, three arrays) are not in
``K``; they are small next to ``B·K·(4 + index_bytes)`` for realistic batches. With
``wire-dtype`` float16 the values cost half, so the same ``K`` sends fewer bytes. The
gradient downlink is the values' size only, ``4/(4 + index_bytes)`` of the uplink.

Unlike the paper's code (``K = round(rate·n·d)`` elements, whose cost then exceeds ``rate``
by the index bits), ``compression`` here fixes the bytes, so all methods compare at equal
uplink.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.registry import register

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

VALUE_BYTES = 4
"""Bytes of one kept value at float32, the dtype ``compression`` is defined at."""


def index_nbytes(numel: int) -> int:
    """Bytes of one flat index in ``[0, numel)`` at the codec's smallest unsigned dtype."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    for nbytes in (1, 2, 4, 8):
        if numel - 1 < 2 ** (8 * nbytes):
            return nbytes
    raise ValueError(f"numel {numel} does not fit 64-bit indices")


def num_kept(compression: float, tokens: int, hidden: int) -> int:
    """``K`` per sample: values+indices bytes ~= ``compression`` x the float32 ``n·d`` bytes."""
    numel = tokens * hidden
    budget = compression * VALUE_BYTES * numel  # bytes per sample
    # the epsilon keeps exact products (e.g. 0.3·4·n·d / 6) from flooring one below
    k = math.floor(budget / (VALUE_BYTES + index_nbytes(numel)) + 1e-9)
    return min(numel, max(1, k))


def _check_compression(value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"top-k: 'compression' = {value!r} must lie in (0, 1]")


@register
class TopKCompressor(Compressor):
    """Keep the ``K`` largest-magnitude elements of each sample's ``(n·d)`` activation."""

    name = "topk"
    adaptive_overrides = ()

    def __init__(self, num_classes: int, *, compression: float = 0.1) -> None:
        """Raises ValueError naming ``compression`` when it is outside (0, 1]."""
        super().__init__(num_classes)
        _check_compression(compression)
        self.compression = float(compression)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> TopKCompressor:
        """Read ``compression``."""
        return cls(num_classes, compression=cfg.compression)

    # ---- client ---------------------------------------------------------------------

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Sparsify ``h`` (B, n, d) to ``values``/``idx`` (B, K); ``cls_attn`` is unused.

        The plan holds the kept positions, so a replay gathers the same elements whatever
        ties or float noise the recomputed ``h`` has.
        """
        b, n, d = h.shape
        flat = h.reshape(b, n * d)  # (B, n·d)
        if plan is None:
            idx = self._select(flat.detach(), num_kept(self.compression, n, d), seed)
        else:
            idx = plan["idx"].to(device=h.device, dtype=torch.int64)
            if idx.dim() != 2 or idx.shape[0] != b:
                raise ValueError(
                    f"{self.name}: plan does not match this batch (idx must be (B, K))"
                )
        values = flat.gather(1, idx)  # (B, K), differentiable w.r.t. h
        return Packet(
            tensors={
                "values": values,
                "idx": idx,
                "shape": torch.tensor([n, d], dtype=torch.int64, device=h.device),
            },
            targets=labels.long(),
            soft_targets=False,
            plan={"idx": idx.to(torch.int32) if n * d <= 2**31 else idx},
        )

    @torch.no_grad()
    def _select(self, flat: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """Kept flat positions ``(B, K)`` int64, ascending per row; ``seed`` unused here."""
        top = flat.abs().topk(k, dim=1, sorted=False).indices  # (B, K)
        return top.sort(dim=1).values

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scatter ``values`` (B, K) at ``idx`` into zeros: the activation ``(B, n, d)``."""
        try:
            values, idx, shape = tensors["values"], tensors["idx"], tensors["shape"]
        except KeyError as err:
            raise ValueError(f"{self.name}: packet lacks tensor {err}") from None
        n, d = (int(s) for s in shape.tolist())
        if idx.shape != values.shape or values.dim() != 2:
            raise ValueError(
                f"{self.name}: values {tuple(values.shape)} and idx {tuple(idx.shape)} must "
                "both be (B, K)"
            )
        b = values.shape[0]
        flat = values.new_zeros(b, n * d).scatter(1, idx.to(values.device).long(), values)
        return flat.view(b, n, d)
