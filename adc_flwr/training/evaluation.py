"""Central evaluation: the client-side modules and the back on a split, uncompressed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adc_flwr.compression import Compressor
from adc_flwr.data import ImageSplit
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import ServerBack
from adc_flwr.training.device import module_device
from adc_flwr.training.workers import back_forward, front_forward


@torch.no_grad()
def evaluate(
    modules: dict[str, nn.Module],
    back: ServerBack,
    split: ImageSplit,
    spec: InputSpec,
    batch_size: int,
    *,
    compressor: Compressor,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the client-side ``modules`` + ``back`` on ``split``.

    ``modules``: by prefix, as :func:`client_modules` builds them (or a copy holding other
    weights, e.g. a probed average). Nothing is compressed: the front's output goes through
    ``compressor.eval_forward``, which keeps only the learned parts (part of the model the
    back was trained on), with the ``encoder`` weights of ``modules``. Runs where the front
    lives (the back and the learned parts must be there too), at ``precision``.
    """
    front, client_part = modules["front"], modules.get("encoder")
    device = module_device(front)
    front.eval()
    back.eval()
    correct, loss_sum = 0, 0.0
    n = len(split.labels)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pixels, labels = spec.batch(split, idx, device)
        h, _ = front_forward(front, pixels, precision, with_cls_attention=False)  # (B, n, d)
        logits = back_forward(back, compressor.eval_forward(h, client_part), precision)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    front.train()
    back.train()
    return correct / n, loss_sum / n
