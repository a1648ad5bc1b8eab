"""No compression: the front's activation goes on the wire as it is (the accuracy ceiling)."""

from __future__ import annotations

import torch

from adc_flwr.compression.base import Compressor, Packet
from adc_flwr.compression.registry import register


@register
class NoCompression(Compressor):
    """Send ``h`` (B, n, d) unchanged with hard labels; nothing to remember in the plan."""

    name = "none"

    def encode(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        cls_attn: torch.Tensor,
        plan: dict[str, torch.Tensor] | None = None,
        *,
        seed: int = 0,
    ) -> Packet:
        """Wrap ``h`` (B, n, d) and ``labels`` (B,) in a Packet; ``cls_attn`` is unused."""
        if h.dim() != 3 or labels.shape != h.shape[:1]:
            raise ValueError(
                f"expected h (B, n, d) and labels (B,), got {tuple(h.shape)} and "
                f"{tuple(labels.shape)}"
            )
        return Packet(tensors={"act": h}, targets=labels.long(), soft_targets=False)

    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The received activation, ``(B, n, d)``."""
        return tensors["act"]
