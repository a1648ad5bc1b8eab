"""No compression: the front's activation goes on the wire as it is (the accuracy ceiling)."""

from __future__ import annotations

import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.registry import register


@register
class NoCompression(Compressor):
    """Send ``h`` (B, n, d) unchanged with hard labels; nothing to remember in the plan."""

    name = "none"

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Wrap ``h`` (B, n, d) and ``labels`` (B,) in a Packet; ``cls_attn`` is unused."""
        return Packet(tensors={"act": h}, targets=labels.long(), soft_targets=False)

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The received activation, ``(B, n, d)``."""
        return tensors["act"]
