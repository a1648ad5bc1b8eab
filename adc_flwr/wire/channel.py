"""The wireless channel between client and server: clean, or AWGN on what is transmitted.

research/paper.md: analog transmission of the split-point tensors, forward (activations) and
backward (gradients), with additive white Gaussian noise whose SNR is drawn uniformly per
message from a dB range. The server applies it to both directions (uplink after a packet is
received, downlink to the gradients it sends), so one seeded generator drives every draw and
a run is reproducible from ``seed`` alone.

Modelling choices:

- Signal power is estimated per vector: per row of the last dimension (one token vector of a
  ``(B, n, d)`` activation or its gradient). A 1-D tensor is one vector; a 0-d tensor is one
  value. Per-vector power keeps low-norm tokens from drowning in noise sized for high-norm
  ones, which a single per-tensor power would do. All-zero vectors (padding, tokens without
  gradient) get no noise, since their estimated power is 0.
- One SNR is drawn per message and shared by every floating tensor of that message.
- Integer and bool tensors (indices, codes, masks) are digital: error-free, never touched.
- The noise is added after the wire dtype round trip, i.e. to the values the receiver decodes.
- Evaluation is not transmitted and is never noisy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from adc_flwr.config import CHANNELS, RunConfig

__all__ = ["Channel", "build_channel"]

_SEED_TAG = 0xC4A7  # separates the channel's stream from other streams seeded by the run seed


class Channel:
    """A clean (identity) or AWGN channel with its own seeded generator.

    Args:
        kind: ``"clean"`` or ``"awgn"``.
        snr_range_db: ``(low, high)``; each message's SNR is uniform in it (low == high: fixed).
        seed: seeds the channel's generator (SNR draws and noise).
    """

    def __init__(
        self, kind: str = "awgn", snr_range_db: tuple[float, float] = (10.0, 10.0), seed: int = 0
    ) -> None:
        if kind not in CHANNELS:
            raise ValueError(f"channel {kind!r} is unknown; allowed values are {CHANNELS}")
        low, high = (float(v) for v in snr_range_db)
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"snr range {snr_range_db!r} must be finite with low <= high")
        self.kind = kind
        self.snr_range_db = (low, high)
        seed_words = np.random.SeedSequence([int(seed), _SEED_TAG]).generate_state(2, np.uint64)
        self.generator = torch.Generator().manual_seed(int(seed_words[0] >> 1))

    @property
    def is_clean(self) -> bool:
        return self.kind == "clean"

    def draw_snr_db(self) -> float:
        """One message's SNR in dB, uniform in the range (no draw when the SNR is fixed)."""
        low, high = self.snr_range_db
        if low == high:
            return low
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64, device="cpu"))
        return low + (high - low) * u

    @torch.no_grad()
    def apply_(self, tensor: torch.Tensor, snr_db: float | None = None) -> float | None:
        """Add the channel's noise to one floating tensor in place (no autograd record).

        ``snr_db`` None: draw a fresh SNR, i.e. treat ``tensor`` as a message of its own.
        Returns the SNR used, or None when nothing was added (clean channel, integer tensor).
        In-place under ``no_grad`` keeps a received leaf a leaf; the gradient of an additive
        noise is the identity, so backward is unchanged.
        """
        if self.is_clean or not tensor.is_floating_point() or tensor.numel() == 0:
            return None
        if snr_db is None:
            snr_db = self.draw_snr_db()
        vectors = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 0 else tensor.reshape(1, 1)
        power = vectors.float().square().mean(dim=1, keepdim=True).cpu()  # (rows, 1)
        std = (power / 10.0 ** (snr_db / 10.0)).sqrt()
        # drawn on the CPU generator wherever the tensor lives: the same noise on any device
        noise = torch.randn(
            vectors.shape, generator=self.generator, dtype=torch.float32, device="cpu"
        )
        noise = noise.mul_(std).to(device=tensor.device, dtype=tensor.dtype)
        tensor.add_(noise.reshape(tensor.shape))
        return snr_db

    def apply_message_(self, tensors: Mapping[str, torch.Tensor | None]) -> float | None:
        """Add noise in place to every floating tensor of ONE message, with one SNR draw.

        Tensors are visited in sorted name order so the draws do not depend on dict order.
        Returns the message's SNR, or None when the message carried nothing floating.
        """
        floating = [
            tensors[k]
            for k in sorted(tensors)
            if tensors[k] is not None and tensors[k].is_floating_point() and tensors[k].numel()
        ]
        if self.is_clean or not floating:
            return None
        snr_db = self.draw_snr_db()
        for t in floating:
            self.apply_(t, snr_db)
        return snr_db

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> torch.Tensor:
        """The generator state, so a resumed run draws what the uninterrupted run would."""
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def build_channel(cfg: RunConfig, seed: int | None = None) -> Channel | None:
    """The run's channel, or None for ``channel = "clean"`` (nothing to do on the wire).
    ``seed``: another noise stream than the run's (None: the run seed's)."""
    if cfg.channel == "clean":
        return None
    return Channel(cfg.channel, cfg.snr_range_db, cfg.seed if seed is None else seed)
