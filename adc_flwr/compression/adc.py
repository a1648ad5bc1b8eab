"""Attention-based Double Compression (ADC, arXiv 2509.15058; research/paper.md).

Two reductions of the front's output ``h`` (B, n, d), both driven by the CLS-attention row of
the last client block:

- batch: K-means over the batch (on the attention row by default) into
  ``T = max(2, int(xi_b·B))`` clusters; each cluster is sent as the mean of its members;
- tokens: per cluster, keep ``k = max(1, int(xi_t·n))`` tokens: CLS plus the ``k-1`` tokens
  with the highest mean CLS attention over the cluster's members.

The server gets ``(T, k, d)`` and soft labels (per-cluster class counts). Its gradient comes
back at ``(T, k, d)`` and autograd through gather/index_add spreads it exactly: each member's
kept tokens receive ``grad / |cluster|``, dropped tokens nothing. No Python loop over
clusters. Unlike the public code, ranking always uses attention whatever the pooling, and no
cluster is ever empty (see :mod:`adc_flwr.compression.kmeans`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.kmeans import check_kmeans_settings, kmeans
from adc_flwr.compression.registry import register

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

POOLINGS = ("attention", "cls", "mean")


def _check_ratio(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"ADC: {key!r} = {value!r} must lie in (0, 1]")


def num_clusters(xi_b: float, batch_size: int) -> int:
    """``T = max(2, int(xi_b·B))``, never more than ``B``."""
    return min(batch_size, max(2, int(xi_b * batch_size)))


def num_tokens(xi_t: float, seq_len: int) -> int:
    """``k = max(1, int(xi_t·n))`` kept tokens, CLS included, never more than ``n``."""
    return min(seq_len, max(1, int(xi_t * seq_len)))


@register
class ADCCompressor(Compressor):
    """ADC: cluster the batch, average each cluster, keep its most-attended tokens."""

    name = "adc"
    adaptive_overrides = ("batch-compression", "token-compression")

    def __init__(
        self,
        num_classes: int,
        *,
        xi: float = 0.1,
        xi_b: float | None = None,
        xi_t: float | None = None,
        pooling: str = "attention",
        kmeans_iters: int = 50,
        kmeans_tol: float = 1e-4,
    ) -> None:
        """``xi_b``/``xi_t`` both given override ``xi``; else each is ``sqrt(xi)``.

        Raises ValueError naming the run-config key (``compression``, ``batch-compression``,
        ``token-compression``, ``pooling``, ``kmeans-iters``, ``kmeans-tol``) when out of range.
        """
        super().__init__(num_classes)
        _check_ratio("compression", xi)
        if (xi_b is None) != (xi_t is None):
            raise ValueError(
                "ADC: 'batch-compression' and 'token-compression' must be given together"
            )
        if xi_b is None or xi_t is None:
            xi_b = xi_t = math.sqrt(xi)
        _check_ratio("batch-compression", xi_b)
        _check_ratio("token-compression", xi_t)
        if pooling not in POOLINGS:
            raise ValueError(f"ADC: 'pooling' = {pooling!r}; allowed values are {POOLINGS}")
        check_kmeans_settings(kmeans_iters, kmeans_tol, owner="ADC")
        self.xi_b = float(xi_b)
        self.xi_t = float(xi_t)
        self.pooling = pooling
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_tol = float(kmeans_tol)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> ADCCompressor:
        """Read ``compression`` / ``batch-compression`` / ``token-compression``, ``pooling``
        and the K-means settings."""
        xi_b, xi_t = cfg.compression_split
        return cls(
            num_classes,
            xi=cfg.compression,
            xi_b=xi_b,
            xi_t=xi_t,
            pooling=cfg.pooling,
            kmeans_iters=cfg.kmeans_iters,
            kmeans_tol=cfg.kmeans_tol,
        )

    # ---- client ---------------------------------------------------------------------

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Compress ``h`` (B, n, d) to ``act`` (T, k, d); targets are (T, C) class counts.

        With ``plan`` the stored assignment and token indices are reused (no K-means), so the
        packet is bit-for-bit the one that produced the plan.
        """
        b, n, d = h.shape
        labels = labels.long().to(h.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"ADC: labels must lie in [0, {self.num_classes})")

        if plan is None:
            assign, token_idx = self._decide(h, cls_attn, seed)
        else:
            # a plan comes back from the client's state on the CPU
            assign, token_idx = plan["assign"].to(h.device), plan["token_idx"].to(h.device)
            if assign.shape != (b,) or token_idx.dim() != 2:
                raise ValueError("ADC: plan does not match this batch (assign must be (B,))")
        t, k = token_idx.shape

        sizes = torch.bincount(assign, minlength=t)  # (T,)
        # row ops on (B·n, d) / (T·k, d) views: each member's kept tokens are summed into
        # its cluster's slots, then divided by the cluster size. Whole d-rows move at once
        # (several times faster than gather/index_add on (B, k, d) with expanded indices)
        token_pos = torch.arange(k, device=h.device)
        src = token_idx.index_select(0, assign) + (torch.arange(b, device=h.device) * n)[:, None]
        dst = (assign * k)[:, None] + token_pos  # (B, k) slot of each kept token
        kept = h.reshape(b * n, d).index_select(0, src.view(-1))  # (B·k, d)
        sums = h.new_zeros(t * k, d).index_add(0, dst.view(-1), kept)  # (T·k, d)
        act = sums.view(t, k, d) / sizes.to(h.dtype).view(t, 1, 1)  # (T, k, d)

        counts = torch.bincount(assign * self.num_classes + labels, minlength=t * self.num_classes)
        return Packet(
            tensors={"act": act},
            targets=counts.view(t, self.num_classes),  # (T, C) int64
            soft_targets=True,
            plan={"assign": assign, "token_idx": token_idx},
        )

    @torch.no_grad()
    def _decide(
        self, h: torch.Tensor, cls_attn: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ids ``(B,)`` and kept token indices ``(T, k)`` (CLS first, then ascending)."""
        b, n, _ = h.shape
        t = num_clusters(self.xi_b, b)
        k = num_tokens(self.xi_t, n)
        attn = cls_attn.detach().float()  # (B, n)
        if self.pooling == "attention":
            desc = attn
        elif self.pooling == "cls":
            desc = h.detach()[:, 0, :]  # (B, d)
        else:
            desc = h.detach().mean(dim=1)  # (B, d)
        # a CPU generator on any device: CUDA runs draw the seeding a CPU run draws
        gen = torch.Generator().manual_seed(seed)
        assign = kmeans(
            desc, t, max_iters=self.kmeans_iters, tol=self.kmeans_tol, generator=gen
        ).assign  # (B,)

        # ranking always by the cluster's mean CLS-attention row, whatever the pooling
        sizes = torch.bincount(assign, minlength=t).to(attn.dtype)  # (T,)
        centroid_attn = attn.new_zeros(t, n).index_add_(0, assign, attn) / sizes.unsqueeze(1)
        top = centroid_attn[:, 1:].topk(k - 1, dim=1, sorted=False).indices + 1  # (T, k-1)
        top = top.sort(dim=1).values
        cls_col = torch.zeros(t, 1, dtype=torch.int64, device=top.device)
        return assign, torch.cat([cls_col, top], dim=1)  # (T, k)

    def row_sources(self, packet: Packet, batch_size: int) -> tuple[Tensor, Tensor]:
        """Row ``t`` is cluster ``t``'s mean: weights ``1/|cluster|`` on its members."""
        assign = packet.plan["assign"]  # (B,)
        t = packet.tensors["act"].shape[0]
        members = torch.zeros(t, batch_size, device=assign.device)  # (T, B)
        members[assign, torch.arange(batch_size, device=assign.device)] = 1.0
        return members / members.sum(dim=1, keepdim=True).clamp_min(1), members.bool()

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged activation ``(T, k, d)``; labels arrive separately as counts."""
        return tensors["act"]
