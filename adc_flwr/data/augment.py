"""The paper's training augmentation (``augment = "paper"``), built from kornia's ops.

The authors' train transform, in their order (``../shared/research/paper.md``): RandAugment
(2 ops, magnitude 9) at the native resolution -> ColorJitter(0.4, 0.4, 0.4, hue 0) ->
resize -> horizontal flip -> normalise. Here the first three image ops run at the native
resolution and the caller resizes and normalises (:func:`~adc_flwr.data.batches.to_model_input`);
the flip comes before the resize, which changes nothing, since a bilinear resize is
mirror-symmetric.

- RandAugment: torchvision's pool (the paper's code: 14 ops, identity among them) and
  strengths at magnitude 9 of 30, built from kornia's ops (:data:`POOL` says why not kornia's
  own ``RandAugment``, whose magnitudes differ); the two ops are drawn **per image**, as
  torchvision does, not once per batch as kornia's does: each op runs once per slot on the
  images that drew it.
- ColorJitter is kornia's, which draws its factors per image but the order of its three
  adjustments once per batch (torchvision: per call, i.e. per image).
- Grey-scale images are augmented as RGB with three equal channels and folded back: every
  op keeps the channels equal, so the saturation ops (RandAugment's ``color``, the jitter's
  saturation) change nothing, and the rest act as on the grey image.
- Seeded: the same ``seed`` gives the same images (the caller derives it from the
  partition's batch number, so a recomputed forward sees the very images of the first).
  The global RNG is left as it was.

kornia: https://kornia.readthedocs.io/en/latest/augmentation.auto.html
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from adc_flwr.config import AUGMENTS

RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 9  # of kornia's (0, 30), as torchvision's num_magnitude_bins = 31
JITTER = 0.4  # brightness, contrast and saturation; hue 0


class Augment(Protocol):
    """A seeded image augmentation: (B, C, H, W) floats in [0, 1] -> the same shape."""

    def __call__(self, images: Tensor, seed: int) -> Tensor: ...


# torchvision's RandAugment pool and magnitudes (num_magnitude_bins = 31, the paper's code):
# at magnitude m an op's strength is its maximum times m / 30; "sign" ops and the enhance
# factors (1 ± strength) take a random sign per image. kornia's own RandAugment maps m over
# each op's (low, high) range instead (brightness 0.1 + 1.8·m/30 = 0.64 at m = 9: always
# darker), translates by 0.1·m/30 of the side and carries invert and solarize-add; so its
# ops are used here with torchvision's pool and values.
_SCALE = RANDAUGMENT_MAGNITUDE / 30
POOL: tuple[tuple[str, float | None], ...] = (
    ("identity", None),
    ("shear_x", 0.3 * _SCALE),  # shear factor, as an angle atan(0.09)
    ("shear_y", 0.3 * _SCALE),
    ("translate_x", 150 / 331 * _SCALE),  # fraction of the side (150 px of 331)
    ("translate_y", 150 / 331 * _SCALE),
    ("rotate", 30 * _SCALE),  # degrees
    ("brightness", 0.9 * _SCALE),  # enhance factor 1 ± 0.27
    ("color", 0.9 * _SCALE),
    ("contrast", 0.9 * _SCALE),
    ("sharpness", 0.9 * _SCALE),
    ("posterize", float(8 - round(RANDAUGMENT_MAGNITUDE / 7.5))),  # bits kept: 7
    ("solarize", 1.0 - _SCALE),  # threshold: invert the pixels above 0.7
    ("auto_contrast", None),
    ("equalize", None),
)
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}  # kornia signs them
_ENHANCE = {"brightness", "color", "contrast", "sharpness"}  # factor 1 ± strength


class PaperAugment:
    """RandAugment(2, 9) per image, ColorJitter(0.4, 0.4, 0.4), horizontal flip (p = 0.5)."""

    def __init__(self) -> None:
        from kornia.augmentation import ColorJitter, RandomHorizontalFlip
        from kornia.augmentation.auto.rand_augment import ops

        def make(name: str, strength: float | None) -> nn.Module | None:
            if name == "identity":
                return None
            if name in _SIGNED:
                return getattr(ops, name)(-strength, strength)
            if name in _ENHANCE:
                return getattr(ops, name)(0.1, 1.9)
            if name == "posterize":
                return ops.posterize(4.0, 8.0)
            if name == "solarize":
                return ops.solarize(0.0, 1.0)
            return getattr(ops, name)(0.0, 1.0)

        self._ops = [(name, strength, make(name, strength)) for name, strength in POOL]
        self._jitter = ColorJitter(JITTER, JITTER, JITTER, 0.0, p=1.0)
        self._flip = RandomHorizontalFlip(p=0.5)
        self._device = torch.device("cpu")

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        """images (B, C, H, W) in [0, 1], C = 1 or 3 -> augmented (B, C, H, W)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
        channels = images.shape[1]
        x = images.expand(-1, 3, -1, -1) if channels == 1 else images
        self._move(x.device)
        cuda = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            x = self._randaugment(x.contiguous())
            x = self._jitter(x)
            x = self._flip(x)
        return x[:, :channels].contiguous().clamp_(0, 1)

    def _randaugment(self, x: Tensor) -> Tensor:
        # two distinct ops per image, uniformly: the first two of a random permutation
        picks = torch.rand(x.shape[0], len(self._ops)).argsort(dim=1)[:, :RANDAUGMENT_OPS]
        picks = picks.to(x.device)
        out = x.clone()
        for slot in range(RANDAUGMENT_OPS):
            for index, (name, strength, op) in enumerate(self._ops):
                rows = (picks[:, slot] == index).nonzero().flatten()
                if op is not None and rows.numel():
                    out[rows] = _apply(name, strength, op, out[rows])
        return out

    def _move(self, device: torch.device) -> None:
        if device != self._device:
            for module in (self._jitter, self._flip, *(op for *_, op in self._ops if op)):
                module.to(device)
            self._device = device


def _apply(name: str, strength: float | None, op: nn.Module, x: Tensor) -> Tensor:
    """One op at torchvision's strength on (b, 3, H, W): the factor is set per row (kornia's
    ``mag`` override), an enhance factor with a random sign of its own."""
    mag = None
    if strength is not None:
        mag = torch.full((x.shape[0],), strength, device=x.device)
        if name in _ENHANCE:
            sign = torch.randint(0, 2, (x.shape[0],)).to(x.device) * 2 - 1
            mag = 1.0 + sign * mag
    params = op.forward_parameters(x.shape, mag=mag)
    return op(x, params)


def build_augment(name: str) -> Augment | None:
    """The ``augment`` run-config key's augmentation; None for ``none``."""
    if name == "none":
        return None
    if name == "paper":
        return PaperAugment()
    raise ValueError(f"run-config key 'augment' = {name!r}: allowed values are {AUGMENTS}")
