"""How close a reconstruction is, and how much a transmitted tensor depends on its input.

Image scores come from ``torchmetrics`` (SSIM with its Gaussian window, PSNR). Distance
correlation (Székely et al., 2007; NoPeek's leakage measure) comes in two estimators, in
torch so they run where the tensors are (tested against the ``dcor`` package):

- :func:`distance_correlation`, the sample statistic NoPeek reports
  (``dcor.distance_correlation``). It is biased upward when the dimension is large against
  the number of rows: a few hundred rows of independent 1000-dimensional vectors score
  above 0.9, so it alone cannot tell leakage from dimension.
- :func:`distance_correlation_unbiased`, the bias-corrected squared distance correlation of
  Székely and Rizzo (2014) (``dcor.u_distance_correlation_sqr``): about 0 for independent
  rows whatever the dimension, 1 for a similarity transform.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SSIM_KERNEL = 11  # torchmetrics' default window; smaller images get the largest odd one that fits


def image_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image ``mse``, ``psnr`` (dB) and ``ssim`` of ``pred`` against ``target``, both
    (N, C, H, W) in [0, 1]. PSNR of an exact match is infinite; it is capped at 100 dB so
    that means over images stay finite."""
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches, got {pred.shape} and {target.shape}")
    pred, target = pred.float().clamp(0, 1), target.float()
    side = min(pred.shape[-2:])
    kernel = min(SSIM_KERNEL, side if side % 2 else side - 1)
    mse = (pred - target).pow(2).flatten(1).mean(dim=1)  # (N,)
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(
        pred, target, data_range=1.0, kernel_size=kernel, reduction="none"
    )
    return {"mse": mse, "psnr": psnr.clamp(max=100.0), "ssim": ssim}


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Distance correlation of paired samples ``x`` (N, ...) and ``y`` (N, ...), in [0, 1]:
    0 when the rows of ``x`` and ``y`` are independent (in the limit), 1 when one is a
    similarity transform of the other. Each row is flattened; float64 throughout."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need the same number (>= 2) of rows, got {x.shape[0]} and {y.shape[0]}")
    a = _centred_distances(x.reshape(x.shape[0], -1).double())  # (N, N)
    b = _centred_distances(y.reshape(y.shape[0], -1).double())  # (N, N)
    dcov2, var_x, var_y = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if var_x <= 0 or var_y <= 0:  # a constant sample: no dependence to measure
        return 0.0
    return float((dcov2.clamp_min(0) / (var_x * var_y).sqrt()).sqrt())


def distance_correlation_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The bias-corrected squared distance correlation of paired rows (N >= 4), in [-1, 1]:
    about 0 when the rows of ``x`` and ``y`` are independent, 1 for a similarity transform."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 4:
        raise ValueError(f"need the same number (>= 4) of rows, got {x.shape[0]} and {y.shape[0]}")
    a = _u_centred_distances(x.reshape(x.shape[0], -1).double())  # (N, N)
    b = _u_centred_distances(y.reshape(y.shape[0], -1).double())  # (N, N)
    cross, var_x, var_y = (a * b).sum(), (a * a).sum(), (b * b).sum()
    if var_x <= 0 or var_y <= 0:
        return 0.0
    return float(cross / (var_x * var_y).sqrt())


def _u_centred_distances(z: torch.Tensor) -> torch.Tensor:
    """The U-centred distance matrix of the rows of ``z`` (N, D): zero diagonal."""
    n = z.shape[0]
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    rows, cols = d.sum(dim=1, keepdim=True), d.sum(dim=0, keepdim=True)
    u = d - rows / (n - 2) - cols / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0.0)


def _centred_distances(z: torch.Tensor) -> torch.Tensor:
    """The doubly centred matrix of Euclidean distances between the rows of ``z`` (N, D)."""
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|²+|b|²-2ab
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()
