"""FLOPs of one split-learning step, for the simulated clock (docs/design.md section 6).

Counted once per model shape with torch's FLOP counter on copies of the modules on the
``meta`` device: shapes only, no memory and no arithmetic, and every matmul and attention
product counted the same way whatever kernel the host would pick (on CPU the fused
attention kernel is invisible to the counter). A ViT's work is linear in the batch, so
counts are per sample and multiplied by the batch a step really has. Not counted: the
compressor's own selection work (K-means, top-k: under 1% of the front at DeiT-Tiny shapes,
BENCHMARKS.md) and the optimizer step.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adc_flwr.compression import Compressor
from adc_flwr.model.vit import ClientFront, ServerBack


def _counted(fn: object) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()  # type: ignore[operator]
    return float(counter.get_total_flops())


def _on_meta(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else copy.deepcopy(module).to("meta")


class StepFlops:
    """FLOPs per sample of each part of a step.

    Attributes:
        client_forward: the front (with the CLS-attention probe) and the compressor's learned
            encoder, one sample.
        client_backward: their backward for one sample (the recomputed forward is counted
            by the caller, as another ``client_forward``).
    """

    def __init__(
        self,
        front: ClientFront,
        back: ServerBack,
        compressor: Compressor,
        pixel_shape: tuple[int, int, int],  # (C, H, W) the front takes
    ) -> None:
        self._front = _on_meta(front)
        self._back = _on_meta(back)
        self._encoder = _on_meta(compressor.client_module())
        self._decoder = _on_meta(compressor.server_module())
        self._pixel_shape = pixel_shape
        self._code_shape: tuple[int, ...] | None = None  # the learned encoder's output, 1 sample
        if self._encoder is not None:
            h, _ = self._front(torch.empty(1, *pixel_shape, device="meta"))
            self._code_shape = tuple(self._encoder(h).shape)
        forward = _counted(lambda: self._client(backward=False))
        self.client_forward = forward
        self.client_backward = _counted(lambda: self._client(backward=True)) - forward
        self.server = cache(self._server)

    def _client(self, *, backward: bool) -> None:
        pixels = torch.empty(1, *self._pixel_shape, device="meta")
        h, _ = self._front(pixels, with_cls_attention=True)  # (1, n, d)
        if self._encoder is not None:
            h = self._encoder(h)
        if backward:
            h.sum().backward()

    def _server(self, tokens: int) -> float:
        """Forward and backward of the back (and learned decoder) for one sample of
        ``tokens`` tokens, gradients w.r.t. its input included: what goes back down."""
        width = self._front.hidden_size

        def step() -> None:
            if self._decoder is not None and self._code_shape is not None:
                code = torch.empty(self._code_shape, device="meta", requires_grad=True)
                x = self._decoder(code)  # (1, n, d): learned methods keep every token
            else:
                x = torch.empty(1, tokens, width, device="meta", requires_grad=True)
            self._back(x).sum().backward()

        return _counted(step)

    def server_step(self, rows: list[tuple[int, int]]) -> float:
        """FLOPs of one server step over packets of (samples, tokens) each."""
        return sum(samples * self.server(tokens) for samples, tokens in rows)


_COUNTED: dict[tuple, StepFlops] = {}


def _signature(*modules: nn.Module | None) -> tuple:
    return tuple(
        None
        if m is None
        else (type(m).__name__, *((n, tuple(p.shape)) for n, p in m.named_parameters()))
        for m in modules
    )


def step_flops(
    front: ClientFront, back: ServerBack, compressor: Compressor, pixel_shape: tuple[int, int, int]
) -> StepFlops:
    """:class:`StepFlops`, counted once per process for each model shape and method."""
    key = (
        _signature(front, back, compressor.client_module(), compressor.server_module()),
        type(compressor).__name__,
        pixel_shape,
    )
    if key not in _COUNTED:
        _COUNTED[key] = StepFlops(front, back, compressor, pixel_shape)
    return _COUNTED[key]
