"""The privacy audit's modes and the columns of ``privacy.csv`` (light: the run directory and
the config read them without loading the audit)."""

from __future__ import annotations

PRIVACY_MODES = ("off", "final", "every-round")
# merged: the image a decoded row stands for (the sample; ADC: its cluster's mean image);
# best-member: the sample that went into the row closest to the reconstruction
REFERENCES = ("merged", "best-member")
PRIVACY_COLUMNS = (
    "round",
    "reference",
    "mse",
    "psnr",
    "ssim",
    "mse_mean_image",
    "psnr_mean_image",
    "ssim_mean_image",
    "dcor",
    "dcor_unbiased",
    "rows",
    "samples",
    "aux_rows",
    "fit_loss",
    "wall_time_s",
)
