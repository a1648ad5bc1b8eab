"""C3-SL (Hsieh et al., 2022): batch-wise compression by circular convolution.

Each sample's activation is flattened to a ``D = n·d`` vector; the batch is split into
``G = B/R`` groups of ``R`` consecutive samples; member ``r`` of a group is bound to its fixed
random key ``k_r`` by circular convolution and the group is summed into one vector:
``s_g = Σ_r k_r ⊛ x_{g,r}``. The server unbinds member ``r`` by circular correlation with
``k_r``: ``x̂_{g,r} = k_r ⋆ s_g``. Both run in the Fourier domain (``rfft``/``irfft``), where
they are products with ``K_r`` and ``conj(K_r)``.

Keys: ``R`` vectors drawn once from the run seed, so client and server build identical keys
and nothing about them is ever sent. By default they are *unitary* (unit-magnitude spectrum,
random phases; Plate's unitary HRR vectors): each has the same per-element variance ``1/D``
as the paper's normal keys, but correlation is then the exact inverse of convolution, so
``R = 1`` round-trips exactly and for ``R > 1`` the only error is crosstalk from the other
members, ``x̂_r - x_r = Σ_{s≠r} x_s ⊛ (k_s ⋆ k_r)``, of expected squared norm
``Σ_{s≠r} ||x_s||²`` (about ``sqrt(R-1)`` relative error for members of equal norm).
``keys="normal"`` gives the paper's ``N(0, 1/D)`` keys, whose self-term ``k_r ⋆ k_r`` is only
approximately a delta: even ``R = 1`` then has about 100% relative error.

Wire: the bound groups ``(G, n, d)``, i.e. the ``(G, D)`` vectors viewed with the sample
shape so the server can reshape without side information (same bytes; the ``.npy`` header
only spells one more dimension). Ratio ``1/R``; the gradient travels back at ``(G, n, d)``
through the default ``_decode_with_leaves`` leaves, and autograd through the FFTs routes it to
every member.

Short batches: the last batch of an epoch may hold ``B % R != 0`` samples. It is padded with
zero samples (constants: no gradient reaches the client from them) to whole groups, and the
packet then carries one extra 0-d integer ``valid = B`` (about 140 bytes, once per epoch);
the server drops the unbound padding rows, so the targets stay the ``B`` real hard labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.registry import register

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

KEY_KINDS = ("unitary", "normal")
_KEY_TAG = 0xC35  # mixed into the run seed: keys do not share a stream with model init


def group_size(compression: float, c3sl_r: int = 0) -> int:
    """``R = c3sl_r`` when > 0, else ``max(1, round(1/compression))``."""
    if c3sl_r > 0:
        return int(c3sl_r)
    if not 0 < compression <= 1:
        raise ValueError(f"C3-SL: 'compression' = {compression!r} must lie in (0, 1]")
    return max(1, round(1.0 / compression))


def make_key_spectra(seed: int, r: int, dim: int, kind: str = "unitary") -> torch.Tensor:
    """``(R, D//2+1)`` complex128 spectra of the ``R`` keys of length ``D``.

    Drawn with numpy from ``(seed, R, D)`` on the CPU, so every process builds the same keys.
    """
    if kind not in KEY_KINDS:
        raise ValueError(f"C3-SL: keys = {kind!r}; allowed values are {KEY_KINDS}")
    rng = np.random.default_rng([int(seed), _KEY_TAG, int(r), int(dim)])
    if kind == "normal":
        keys = rng.normal(0.0, dim**-0.5, size=(r, dim))  # (R, D), variance 1/D
        return torch.fft.rfft(torch.from_numpy(keys), dim=-1)
    nfreq = dim // 2 + 1
    phase = rng.uniform(0.0, 2 * np.pi, size=(r, nfreq))  # (R, F)
    # a real key needs real DC (and Nyquist, for even D) bins: phase 0 or pi
    real_bins = [0, nfreq - 1] if dim % 2 == 0 else [0]
    phase[:, real_bins] = np.pi * rng.integers(0, 2, size=(r, len(real_bins)))
    magnitude = torch.ones(r, nfreq, dtype=torch.float64, device="cpu")  # moved when used
    return torch.polar(magnitude, torch.from_numpy(phase))


@register
class C3SLCompressor(Compressor):
    """C3-SL: ``R`` samples share one wire vector, each bound to its own fixed key."""

    name = "c3sl"

    def __init__(
        self,
        num_classes: int,
        *,
        r: int = 2,
        seed: int = 0,
        batch_size: int | None = None,
        keys: str = "unitary",
    ) -> None:
        """``r`` samples per group, keys from ``seed`` (the run seed, not the step seed).

        ``batch_size``, when given, must be a multiple of ``r`` (only an epoch's last short
        batch may not be; it is padded). Raises ValueError naming the run-config keys.
        """
        super().__init__(num_classes)
        if r < 1:
            raise ValueError(f"C3-SL: group size 'c3sl-r' = {r!r} must be >= 1")
        if batch_size is not None and batch_size % r != 0:
            raise ValueError(
                f"C3-SL: 'batch-size' = {batch_size} must be a multiple of the group size "
                f"R = {r} (set by 'c3sl-r', or round(1/'compression') when 'c3sl-r' is 0)"
            )
        if keys not in KEY_KINDS:
            raise ValueError(f"C3-SL: keys = {keys!r}; allowed values are {KEY_KINDS}")
        self.r = int(r)
        self.seed = int(seed)
        self.keys = keys
        self._spectra: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> C3SLCompressor:
        """``R`` from ``c3sl-r`` or ``compression``; keys from ``seed``; checks ``batch-size``."""
        r = group_size(cfg.compression, cfg.c3sl_r)
        return cls(num_classes, r=r, seed=cfg.seed, batch_size=cfg.batch_size)

    def key_spectra(self, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(R, D//2+1)`` complex key spectra at the FFT dtype of ``dtype``, cached."""
        cache_key = (dim, dtype, device)
        if cache_key not in self._spectra:
            complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
            spectra = make_key_spectra(self.seed, self.r, dim, self.keys)
            self._spectra[cache_key] = spectra.to(device=device, dtype=complex_dtype)
        return self._spectra[cache_key]

    # ---- client ---------------------------------------------------------------------

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Bind and sum groups of ``R`` samples: ``h`` (B, n, d) -> ``act`` (ceil(B/R), n, d).

        Deterministic given the batch, so the plan is empty and ``seed`` unused.
        """
        b, n, d = h.shape
        r, dim = self.r, n * d
        groups = -(-b // r)  # ceil(B/R)
        # FFTs need float32/64: half-precision fronts are bound in float32
        x = h.reshape(b, dim) if h.dtype == torch.float64 else h.reshape(b, dim).float()  # (B, D)
        if groups * r != b:  # short batch: zero samples complete the last group
            x = torch.cat([x, x.new_zeros(groups * r - b, dim)])  # (G·R, D)
        spec = torch.fft.rfft(x.view(groups, r, dim), dim=-1)  # (G, R, F)
        keys = self.key_spectra(dim, x.dtype, x.device)  # (R, F)
        bound = torch.fft.irfft((spec * keys).sum(dim=1), n=dim, dim=-1)  # (G, D)
        tensors = {"act": bound.view(groups, n, d)}
        if groups * r != b:
            # 0-d: the real sample count
            tensors["valid"] = torch.tensor(b, dtype=torch.int64, device=h.device)
        return Packet(tensors=tensors, targets=labels.long(), soft_targets=False)

    def row_sources(self, packet: Packet, batch_size: int) -> tuple[Tensor, Tensor]:
        """The server unbinds one row per sample; a group's ``R`` samples share its wire row."""
        group = torch.arange(batch_size, device=packet.targets.device) // self.r  # (B,)
        return torch.eye(batch_size, device=group.device), group[:, None] == group[None, :]

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unbind every member by circular correlation: ``act`` (G, n, d) -> (B, n, d)."""
        bound = tensors["act"]
        if bound.dtype not in (torch.float32, torch.float64):
            bound = bound.float()
        if bound.dim() != 3:
            raise ValueError(f"C3-SL: expected act (G, n, d), got {tuple(bound.shape)}")
        groups, n, d = bound.shape
        r, dim = self.r, n * d
        keys = self.key_spectra(dim, bound.dtype, bound.device)  # (R, F)
        spec = torch.fft.rfft(bound.reshape(groups, 1, dim), dim=-1)  # (G, 1, F)
        members = torch.fft.irfft(spec * keys.conj(), n=dim, dim=-1)  # (G, R, D)
        out = members.reshape(groups * r, n, d)  # (G·R, n, d)
        if "valid" in tensors:
            out = out[: int(tensors["valid"])]  # drop the padding of a short batch
        return out
