"""FedLite (Wang et al., 2022): product quantisation of the split activation.

Every token vector of ``h`` (B, n, d) is cut into ``q`` sub-vectors of ``s = d/q`` values.
Sub-vector group ``j`` (all B·n tokens) is clustered on its own into ``L`` centroids with the
project's batched K-means (one call on ``(q, B·n, s)``). The wire carries the codebooks
``(q, L, s)`` (floats at the wire dtype) and the codes ``(B, n, q)`` (uint8 while L <= 256).

Backward (as FedLite): the codes carry no gradient, so the server differentiates w.r.t. the
reconstructed activation ``h_q`` (B, n, d) and sends that dense gradient back; the downlink
is not compressed. On the client the anchor is ``h_q`` with a straight-through backward to
``h``, plus FedLite's gradient correction ``g + λ·(h - h_q)`` (λ = ``pq-lambda``, 0 disables):
a first-order guess of the gradient at ``h`` from the one at ``h_q``.

Choosing (q, L) from ``compression`` (when ``pq-subvectors``/``pq-centroids`` are 0). The
ratio is measured in bytes, as the accounting does: the codec's bytes of codebook + codes
over the uncompressed float32 activation's bytes (headers and keys included), i.e. roughly

    ratio ≈ q·c/(4d) + L·f/(4·B·n),   c = code bytes (1 for L <= 256), f = wire float bytes.

For every divisor q of d, the L in [2, min(256, B·n)] whose ratio is closest to the request
is found (exactly, from the byte formula); among the q whose ratio lies within 5% of the
request, the one with the most code bits per token, ``q·log2(L)``, wins (the finest
quantisation the budget buys; ties: fewer bytes). If none is within 5%, the closest ratio
wins. One override fixes that parameter and the other is fitted the same way; both given
are used as they are (L capped at B·n). At B=64, n=50, d=64, float32 this reaches
about 0.005 (q=1, L=2) to 0.33 (q=64, L=256); levels are near ``q/(4d)`` plus a codebook
term up to ``256·f/(4·B·n)``, so where that term is small (large B·n) requests between two
levels of q are met at the closest level only (``choose_levels`` reports the ratio). A
16-bit wire dtype halves the codebook term and so widens those gaps (at the shape above,
0.2 gets 0.165). Requests past the top level need ``pq-centroids`` > 256 (uint16 codes).

Plan: the codes (and the K-means seed, for the record). With a plan K-means is not rerun;
the centroids are recomputed as the member means of the recomputed ``h``, by the same code
as in the first pass, so an identical ``h`` gives identical bits (on CPU; CUDA's float
``index_add_`` uses atomics unless deterministic algorithms are switched on). The plan keeps
the codes as uint8 while L <= 256.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.kmeans import check_kmeans_settings, kmeans
from adc_flwr.compression.registry import register
from adc_flwr.config import WIRE_DTYPES
from adc_flwr.wire.sizes import npy_header_nbytes, uncompressed_act_nbytes

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

MAX_AUTO_CENTROIDS = 256
"""Largest L the automatic rule picks: codes stay uint8 and K-means stays affordable."""
TOLERANCE = 0.05
"""Relative distance to the requested ratio the automatic rule aims to stay within."""

CODEBOOK, CODES, ANCHOR = "codebook", "codes", "act"
_WIRE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


# ---- bytes and the choice of (q, L) --------------------------------------------------------


def _array_nbytes(dtype: type[np.generic], shape: tuple[int, ...], key: str) -> int:
    """What the codec counts for one array: ``np.save`` bytes plus the key's length."""
    dt = np.dtype(dtype)
    return npy_header_nbytes(dt, shape) + math.prod(shape) * dt.itemsize + len(key)


def _code_dtype(num_centroids: int) -> type[np.generic]:
    """The codec's dtype for codes in [0, L-1] (no cluster is empty, so L-1 occurs)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_centroids - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


def pq_nbytes(
    batch: int, tokens: int, hidden: int, q: int, num_centroids: int, wire_dtype: str
) -> int:
    """Exact uplink activation bytes of a pq packet (codebook + codes) through the codec."""
    s = hidden // q
    codebook = _array_nbytes(_WIRE_NUMPY[wire_dtype], (q, num_centroids, s), f"f:{CODEBOOK}")
    codes = _array_nbytes(_code_dtype(num_centroids), (batch, tokens, q), f"i:{CODES}")
    return codebook + codes


def _best_centroids(
    batch: int, tokens: int, hidden: int, q: int, target: float, wire_dtype: str, l_max: int
) -> int:
    """The L in [min(2, l_max), l_max] whose bytes ratio is closest to ``target``.

    Bytes are affine in L while the code dtype is fixed, so each dtype regime is solved in
    closed form and its neighbours checked.
    """
    ref = uncompressed_act_nbytes(batch, tokens, hidden)
    l_min = min(2, l_max)
    candidates = {l_min, l_max}
    lo = l_min
    for dtype in (np.uint8, np.uint16, np.uint32):
        hi = min(l_max, int(np.iinfo(dtype).max) + 1)
        if lo > hi:
            break
        b_lo = pq_nbytes(batch, tokens, hidden, q, lo, wire_dtype)
        per_l = hidden * np.dtype(_WIRE_NUMPY[wire_dtype]).itemsize  # q·s·f bytes per centroid
        guess = lo + round((target * ref - b_lo) / per_l)
        for cand in (guess - 1, guess, guess + 1, lo, hi):
            candidates.add(min(hi, max(lo, cand)))
        lo = hi + 1
    return min(
        sorted(candidates),
        key=lambda c: abs(pq_nbytes(batch, tokens, hidden, q, c, wire_dtype) / ref - target),
    )


@functools.lru_cache(maxsize=256)
def choose_levels(
    batch: int,
    tokens: int,
    hidden: int,
    target: float,
    wire_dtype: str = "float32",
    subvectors: int = 0,
    centroids: int = 0,
) -> tuple[int, int, float]:
    """(q, L, achieved bytes ratio) for a ``(batch, tokens, hidden)`` activation.

    ``subvectors``/``centroids`` > 0 fix q / L (the rule in the module docstring fits the
    other); the automatic L never exceeds 256, no L exceeds ``batch·tokens``.
    """
    n_points = batch * tokens
    if subvectors and hidden % subvectors:
        raise ValueError(
            f"pq: 'pq-subvectors' = {subvectors} must divide the hidden size d = {hidden}"
        )
    ref = uncompressed_act_nbytes(batch, tokens, hidden)
    qs = [subvectors] if subvectors else [q for q in range(1, hidden + 1) if hidden % q == 0]
    options = []  # (q, L, ratio)
    for q in qs:
        if centroids:
            n_c = min(centroids, n_points)
        else:
            l_max = min(MAX_AUTO_CENTROIDS, n_points)
            n_c = _best_centroids(batch, tokens, hidden, q, target, wire_dtype, l_max)
        options.append((q, n_c, pq_nbytes(batch, tokens, hidden, q, n_c, wire_dtype) / ref))

    close = [o for o in options if abs(o[2] / target - 1) <= TOLERANCE]
    if close:
        q, n_c, ratio = min(close, key=lambda o: (-o[0] * math.log2(max(o[1], 1)), o[2]))
    else:
        q, n_c, ratio = min(options, key=lambda o: (abs(o[2] / target - 1), o[2]))
    return q, n_c, ratio


# ---- tensor helpers -------------------------------------------------------------------------


def _member_means(sub: torch.Tensor, codes: torch.Tensor, num_centroids: int) -> torch.Tensor:
    """Codebooks ``(q, L, s)``: per group, the mean of the sub-vectors ``sub`` (q, N, s)
    assigned to each centroid by ``codes`` (q, N). One index_add over all q·N rows."""
    q, n, s = sub.shape
    offsets = torch.arange(q, device=codes.device).unsqueeze(1) * num_centroids  # (q, 1)
    flat = (codes + offsets).reshape(-1)  # (q·N,)
    sums = sub.new_zeros(q * num_centroids, s).index_add_(0, flat, sub.reshape(q * n, s))
    sizes = torch.bincount(flat, minlength=q * num_centroids).clamp_min_(1)  # (q·L,)
    return (sums / sizes.unsqueeze(1).to(sub.dtype)).view(q, num_centroids, s)


def reconstruct(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``h_q`` (B, n, q·s) from codebooks (q, L, s) and codes (B, n, q)."""
    q, n_c, s = codebook.shape
    b, n, _ = codes.shape
    flat = (codes + torch.arange(q, device=codes.device) * n_c).reshape(-1)  # (B·n·q,)
    rows = codebook.reshape(q * n_c, s).index_select(0, flat)  # (B·n·q, s)
    return rows.view(b, n, q * s)


def _plan_code_dtype(num_centroids: int) -> torch.dtype:
    """Codes kept in the client's state at 1 byte each while L <= 256 (int64 is 8x)."""
    return torch.uint8 if num_centroids <= 256 else torch.int32


class _QuantizedAnchor(torch.autograd.Function):
    """Forward: ``h_q``. Backward: the gradient at ``h_q`` goes straight to ``h``, plus
    FedLite's correction ``λ·(h - h_q)``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, h_q: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        ctx.residual = (h.detach() - h_q) if lam else None  # (B, n, d)
        return h_q.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.residual is None:
            return grad, None, None
        return grad + ctx.lam * ctx.residual, None, None


# ---- the compressor -------------------------------------------------------------------------


@register
class ProductQuantizer(Compressor):
    """FedLite: per-group K-means codebooks and codes up, dense gradient at ``h_q`` down."""

    name = "pq"
    adaptive_overrides = ("pq-subvectors", "pq-centroids")

    def __init__(
        self,
        num_classes: int,
        *,
        compression: float = 0.1,
        subvectors: int = 0,
        centroids: int = 0,
        lam: float = 0.0,
        wire_dtype: str = "float32",
        kmeans_iters: int = 50,
        kmeans_tol: float = 1e-4,
    ) -> None:
        """``subvectors`` (q) / ``centroids`` (L): 0 lets ``compression`` decide (per batch
        shape, see :func:`choose_levels`). Errors name the run-config key."""
        super().__init__(num_classes)
        if not 0 < compression <= 1:
            raise ValueError(f"pq: 'compression' = {compression!r} must lie in (0, 1]")
        if subvectors < 0:
            raise ValueError(f"pq: 'pq-subvectors' = {subvectors!r} must be >= 0 (0: auto)")
        if centroids < 0:
            raise ValueError(f"pq: 'pq-centroids' = {centroids!r} must be >= 0 (0: auto)")
        if not lam >= 0:
            raise ValueError(f"pq: 'pq-lambda' = {lam!r} must be >= 0")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"pq: 'wire-dtype' = {wire_dtype!r}; allowed: {WIRE_DTYPES}")
        check_kmeans_settings(kmeans_iters, kmeans_tol, owner="pq")
        self.compression = float(compression)
        self.subvectors = int(subvectors)
        self.centroids = int(centroids)
        self.lam = float(lam)
        self.wire_dtype = wire_dtype
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_tol = float(kmeans_tol)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> ProductQuantizer:
        """Read ``compression``, ``pq-subvectors``, ``pq-centroids``, ``pq-lambda``,
        ``wire-dtype`` and the K-means settings; with ``hidden_size`` check q divides d now."""
        if hidden_size is not None and cfg.pq_subvectors and hidden_size % cfg.pq_subvectors:
            raise ValueError(
                f"pq: 'pq-subvectors' = {cfg.pq_subvectors} must divide the hidden size "
                f"d = {hidden_size}"
            )
        return cls(
            num_classes,
            compression=cfg.compression,
            subvectors=cfg.pq_subvectors,
            centroids=cfg.pq_centroids,
            lam=cfg.pq_lambda,
            wire_dtype=cfg.wire_dtype,
            kmeans_iters=cfg.kmeans_iters,
            kmeans_tol=cfg.kmeans_tol,
        )

    def levels(self, batch: int, tokens: int, hidden: int) -> tuple[int, int]:
        """(q, L) used for a ``(batch, tokens, hidden)`` activation."""
        q, n_c, _ = choose_levels(
            batch,
            tokens,
            hidden,
            self.compression,
            self.wire_dtype,
            self.subvectors,
            self.centroids,
        )
        return q, n_c

    # ---- client ---------------------------------------------------------------------

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Codebooks ``(q, L, s)`` and codes ``(B, n, q)`` up; anchor ``act`` = ``h_q``.

        With ``plan`` the stored codes are reused (no K-means) and only the codebooks are
        recomputed from ``h``.
        """
        b, n, d = h.shape
        q, n_c = self.levels(b, n, d)
        s = d // q
        sub = h.detach().reshape(b * n, q, s).transpose(0, 1).contiguous()  # (q, B·n, s)

        if plan is None:
            gen = torch.Generator().manual_seed(seed)  # CPU draws on any device (kmeans)
            assign = kmeans(
                sub, n_c, max_iters=self.kmeans_iters, tol=self.kmeans_tol, generator=gen
            ).assign  # (q, B·n)
            codes = assign.t().contiguous().view(b, n, q)  # (B, n, q)
            plan_seed = torch.tensor([seed], dtype=torch.int64, device=h.device)
        else:
            codes, plan_seed = plan[CODES], plan["seed"]
            if codes.shape != (b, n, q):
                raise ValueError(
                    f"pq: plan codes {tuple(codes.shape)} do not match this batch ({b}, {n}, {q})"
                )
            codes = codes.to(device=h.device, dtype=torch.int64).contiguous()
            assign = codes.view(b * n, q).t().contiguous()  # (q, B·n)

        codebook = _member_means(sub, assign, n_c)  # (q, L, s)
        h_q = reconstruct(codebook, codes)  # (B, n, d)
        anchor = _QuantizedAnchor.apply(h, h_q, self.lam)
        return Packet(
            tensors={CODEBOOK: codebook, CODES: codes},
            targets=labels.long(),
            soft_targets=False,
            plan={CODES: codes.to(_plan_code_dtype(n_c)), "seed": plan_seed},
            anchors={ANCHOR: anchor},
        )

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reconstruction ``h_q`` (B, n, d) from the codebooks and codes (no gradient)."""
        return reconstruct(tensors[CODEBOOK].detach(), tensors[CODES].long())

    def _decode_with_leaves(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``h_q`` as a fresh leaf, named like the client's anchor: its dense gradient goes
        back (FedLite sends the gradient w.r.t. the quantised activation)."""
        h_q = self._decode(tensors).requires_grad_(True)  # (B, n, d) leaf
        return h_q, {ANCHOR: h_q}
