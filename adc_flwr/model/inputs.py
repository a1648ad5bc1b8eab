"""How raw uint8 images become model inputs: size, channels and normalisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adc_flwr.data import DataBundle, ImageSplit, to_model_input
from adc_flwr.model.preprocessing import input_statistics
from adc_flwr.model.vit import model_input_spec


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model inputs (size, channels, normalisation)."""

    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return self.num_channels, self.image_size, self.image_size

    @classmethod
    def for_model(cls, vit: nn.Module, data: DataBundle, model: str | None = None) -> InputSpec:
        """The model's size and channels; the mean/std of a checkpoint's image processor, else
        ``data``'s (:func:`~adc_flwr.model.preprocessing.input_statistics`). ``model``: the
        run-config key, needed for a checkpoint (it expects the statistics it was trained
        with)."""
        image_size, num_channels = model_input_spec(vit)
        if model is None and getattr(vit, "name_or_path", ""):
            raise ValueError("a checkpoint's input spec needs model= (the run-config key)")
        mean, std = input_statistics(model or "", image_size, data.mean, data.std)
        return cls(image_size, num_channels, mean, std)

    def batch(
        self,
        split: ImageSplit,
        idx: np.ndarray,
        device: torch.device | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (B, C, S, S) float32 and labels (B,) int64 for indices ``idx``, on
        ``device`` (None: the CPU). Off the CPU the uint8 images travel and are resized and
        normalised there (4x fewer bytes to copy, and the GPU does the resizing).
        ``augment``: the training augmentation, on [0, 1] images before the resize."""
        images = split.images[idx]
        on_cpu = device is None or device.type == "cpu"
        if not on_cpu:
            images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        pixels = to_model_input(
            images,
            image_size=self.image_size,
            num_channels=self.num_channels,
            mean=self.mean,
            std=self.std,
            augment=augment,
        )
        labels = torch.from_numpy(split.labels[idx]).long()
        return pixels, labels if on_cpu else labels.to(device)
