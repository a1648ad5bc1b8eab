"""Randomized Top-K sparsification (Zheng et al., IJCAI 2023; research/paper.md, "Baselines").

As :mod:`adc_flwr.compression.topk` (same ``K``, same wire format, same gradient path), but
the ``K`` kept positions are drawn without replacement from a distribution that puts mass
``1 - p`` uniformly on the sample's true top-K positions and ``p`` uniformly on the other
``n·d - K``. Sending some small elements keeps their gradients flowing, which is the point of
the method; ``p = 0`` is plain top-k.

Sampling without replacement uses the exponential race (Gumbel top-k): position ``i`` with
weight ``w_i`` gets the key ``w_i / E_i``, ``E_i ~ Exp(1)``, and the ``K`` largest keys are a
sample of successive draws proportional to ``w`` (what ``torch.multinomial`` without
replacement does), vectorised over the batch. The noise comes from a CPU generator seeded
with ``encode(..., seed=)`` and is moved to the activation's device (a seed draws the same
noise on a GPU); the plan keeps the drawn positions, so a replay is bit-exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from adc_flwr.compression.registry import register
from adc_flwr.compression.topk import TopKCompressor

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig


@register
class RandomTopKCompressor(TopKCompressor):
    """Top-K whose kept positions are sampled: ``1 - p`` of the mass on the top-K."""

    name = "random-topk"

    def __init__(self, num_classes: int, *, compression: float = 0.1, p: float = 0.1) -> None:
        """Raises ValueError naming ``compression`` or ``random-topk-p`` when out of range."""
        super().__init__(num_classes, compression=compression)
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"random-topk: 'random-topk-p' = {p!r} must lie in [0, 1]")
        self.p = float(p)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> RandomTopKCompressor:
        """Read ``compression`` and ``random-topk-p``."""
        return cls(num_classes, compression=cfg.compression, p=cfg.random_topk_p)

    @torch.no_grad()
    def _select(self, flat: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """``K`` distinct flat positions ``(B, K)`` int64 per sample, ascending per row."""
        b, numel = flat.shape
        if k >= numel:
            return torch.arange(numel, device=flat.device).expand(b, numel).clone()
        top = flat.abs().topk(k, dim=1, sorted=False).indices  # (B, K)
        # per-position weights: (1-p)/K on the top-K, p/(n·d-K) elsewhere (sum 1 per row)
        weights = torch.full(
            (b, numel), self.p / (numel - k), dtype=torch.float32, device=flat.device
        )  # (B, n·d)
        weights.scatter_(1, top, (1.0 - self.p) / k)
        # drawn on a CPU generator and moved: the same positions for a seed on any device
        gen = torch.Generator().manual_seed(seed)
        race = torch.empty(weights.shape, dtype=torch.float32, device="cpu")
        race = race.exponential_(generator=gen)
        race = race.to(flat.device)  # (B, n·d) ~ Exp(1)
        # the tiny floor keeps keys finite (an exact 0 draw); w <= 1 so w/tiny < float32 max
        keys = weights / race.clamp_min_(torch.finfo(torch.float32).tiny)
        idx = keys.topk(k, dim=1, sorted=False).indices  # (B, K), distinct per row
        return idx.sort(dim=1).values
