"""From indices to model input: deterministic mini-batches and uint8 -> normalised floats."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(
    images: np.ndarray | torch.Tensor,
    *,
    image_size: int,
    num_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, num_channels, image_size, image_size), normalised.

    Resizes with bilinear interpolation (antialiased when shrinking) when sizes differ and
    repeats a grayscale channel when the model wants 3. Floating input is taken as already
    in [0, 1]. ``mean``/``std`` have one entry per source channel, per model channel or
    a single entry. ``augment`` (training only) runs on the [0, 1] images at their native
    size, before the resize (:mod:`~adc_flwr.data.augment`).
    """
    if isinstance(images, np.ndarray):
        # astype copies, so read-only slices of the shared bundle convert without a warning.
        scale = 1.0 if images.dtype.kind == "f" else 255.0
        x = torch.from_numpy(images.astype(np.float32)) / scale
    else:
        x = images.to(torch.float32) if images.is_floating_point() else images.float() / 255.0
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if augment is not None:
        x = augment(x)
    c = x.shape[1]
    if c != num_channels and not (c == 1 and num_channels == 3):
        raise ValueError(
            f"images have {c} channels but the model wants {num_channels}; only 1 -> 3 is "
            "converted (build the model with the bundle's num_channels)"
        )
    if x.shape[-2:] != (image_size, image_size):
        shrink = x.shape[-1] > image_size or x.shape[-2] > image_size
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink
        )
    m = torch.as_tensor(tuple(mean), dtype=torch.float32, device=x.device)
    s = torch.as_tensor(tuple(std), dtype=torch.float32, device=x.device)
    if c != num_channels and num_channels in (m.numel(), s.numel()):
        # per model channel (a checkpoint's statistics): repeat the gray channel first
        x = x.expand(-1, num_channels, -1, -1)
        c = num_channels
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(f"mean/std need 1 or {c} entries, got {m.numel()} and {s.numel()}")
    x = (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    if c != num_channels:
        x = x.expand(-1, num_channels, -1, -1).contiguous()
    return x


class BatchCursor:
    """Deterministic mini-batches over one partition's indices, from any batch number on.

    Each epoch uses the permutation drawn from ``(seed, epoch)``, so the sequence depends on
    nothing but these numbers. Every index appears once per epoch; the last short batch is
    returned as is, except that a 1-sample remainder is dropped (ADC clustering and
    batch statistics need 2) unless it is the only batch of the epoch.
    """

    def __init__(
        self, indices: np.ndarray, batch_size: int, seed: int, epoch: int = 0, position: int = 0
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or self.indices.size == 0:
            raise ValueError("BatchCursor needs a non-empty 1-D array of indices")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        n = self.indices.size
        full, rest = divmod(n, self.batch_size)
        self.steps_per_epoch = full + (1 if rest >= 2 or (rest == 1 and full == 0) else 0)
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch={epoch} and position={position} must be >= 0")
        epoch += position // self.steps_per_epoch
        self.epoch = int(epoch)
        self.position = int(position % self.steps_per_epoch)
        self._order_epoch = -1
        self._order = self.indices

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = self.indices[rng.permutation(self.indices.size)]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """The next batch of indices (a fresh array); rolls over into the next epoch."""
        order = self._epoch_order()
        start = self.position * self.batch_size
        batch = order[start : start + self.batch_size].copy()
        self.position += 1
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch
