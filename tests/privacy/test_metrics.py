"""Leakage scores: distance correlation as the ``dcor`` package computes it, image scores."""

from __future__ import annotations

import dcor
import pytest
import torch

from adc_flwr.privacy.metrics import (
    distance_correlation,
    distance_correlation_unbiased,
    image_scores,
)


def pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dependent, non-linear pairs: y is a noisy square of part of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, generator=g)
    y = x[:, 0] ** 2 + 0.5 * torch.randn(n, 4, generator=g)
    return x, y


@pytest.mark.parametrize("n", [4, 37, 200])
def test_distance_correlations_agree_with_the_dcor_package(n: int) -> None:
    x, y = pair(n, seed=n)
    xn, yn = x.reshape(n, -1).double().numpy(), y.double().numpy()
    assert distance_correlation(x, y) == pytest.approx(dcor.distance_correlation(xn, yn), abs=1e-9)
    assert distance_correlation_unbiased(x, y) == pytest.approx(
        dcor.u_distance_correlation_sqr(xn, yn), abs=1e-9
    )


def test_bias_corrected_dcor_tells_independence_from_dimension() -> None:
    """Independent wide rows: the sample statistic is near 1, the corrected one near 0."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 1000, generator=g), torch.randn(200, 700, generator=g)
    assert distance_correlation(x, y) > 0.9
    assert abs(distance_correlation_unbiased(x, y)) < 0.01
    rotation, _ = torch.linalg.qr(torch.randn(1000, 1000, generator=g, dtype=torch.float64))
    similar = 3.0 * x.double() @ rotation + 5.0  # a similarity transform of x
    assert distance_correlation_unbiased(x, similar) == pytest.approx(1.0, abs=1e-9)
    assert distance_correlation(x, similar) == pytest.approx(1.0, abs=1e-9)


def test_distance_correlation_rejects_unpaired_rows() -> None:
    with pytest.raises(ValueError, match="same number"):
        distance_correlation(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=">= 4"):
        distance_correlation_unbiased(torch.zeros(3, 2), torch.zeros(3, 2))


def test_image_scores_of_a_copy_a_shift_and_noise() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 1, 28, 28, generator=g)
    same = image_scores(images, images)
    assert torch.all(same["mse"] == 0) and torch.all(same["psnr"] == 100.0)
    assert torch.allclose(same["ssim"], torch.ones(6))
    noisy = image_scores(
        (images + 0.1 * torch.randn(6, 1, 28, 28, generator=g)).clamp(0, 1), images
    )
    assert torch.all(noisy["ssim"] < 0.95) and torch.all(noisy["psnr"] < 25)
    # PSNR is 10 log10(1 / MSE) for images in [0, 1]
    assert torch.allclose(noisy["psnr"], 10 * torch.log10(1 / noisy["mse"]), atol=1e-4)


def test_image_scores_fit_small_images_and_check_shapes() -> None:
    """8 px digits get the largest odd SSIM window that fits (7)."""
    a = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(image_scores(a, a)["ssim"], torch.ones(3))
    with pytest.raises(ValueError, match="two"):
        image_scores(a, a[:, :1])
