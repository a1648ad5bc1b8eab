"""BottleNet++ (Shao and Zhang, 2020) in its ViT form (research/paper.md, "Baselines").

A small per-token MLP squeezes the front's output ``h`` (B, n, d) to ``(B, n, w)`` on the
client and a twin MLP expands it back to ``(B, n, d)`` on the server; both train end to end
with the rest of the model (the encoder with the front, the decoder with the back). The
wire carries ``(B, n, w)`` up and its gradient down, so the ratio is ``w / d`` both ways.

Layers: ``bottlenet-layers`` Linear layers per side, widths spaced linearly between d and w,
ReLU between consecutive Linears. Unlike the public code, neither side ends in a ReLU: the
decoder's output replaces a residual stream that takes negative values, and a full-width
single-layer pair can then represent the identity exactly.

Where the modules run: the base class's ``encode`` applies the encoder (``client_module()``)
to the front's output before the ``_encode`` hook, which only wraps the code; ``decode`` and
``server_decode`` apply the decoder (``server_module()``) to the received code, and
``eval_forward`` is decoder(encoder(h)). No caller applies either module itself.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from adc_flwr.compression.base import Compressor, Packet, Plan
from adc_flwr.compression.registry import register
from adc_flwr.model.vit import PRESETS

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig


def bottleneck_width(hidden_size: int, compression: float, width: int = 0) -> int:
    """``width`` when given (> 0), else ``round(compression·d)``, at least 1 and at most d."""
    if hidden_size < 1:
        raise ValueError(f"bottlenet: hidden size d = {hidden_size!r} must be >= 1")
    if width < 0 or width > hidden_size:
        raise ValueError(
            f"bottlenet: 'bottlenet-width' = {width!r} must lie in [0, d={hidden_size}] "
            "(0: round(compression·d))"
        )
    if width:
        return int(width)
    if not 0 < compression <= 1:
        raise ValueError(f"bottlenet: 'compression' = {compression!r} must lie in (0, 1]")
    return min(hidden_size, max(1, round(compression * hidden_size)))


def linear_widths(d_in: int, d_out: int, num_layers: int) -> list[int]:
    """``num_layers + 1`` widths from ``d_in`` to ``d_out``, linearly spaced and rounded."""
    if num_layers < 1:
        raise ValueError(f"bottlenet: 'bottlenet-layers' = {num_layers!r} must be >= 1")
    return [round(d_in + (d_out - d_in) * i / num_layers) for i in range(num_layers + 1)]


class TokenMLP(nn.Sequential):
    """Per-token MLP ``(..., widths[0]) -> (..., widths[-1])``: Linear, ReLU, ..., Linear."""

    def __init__(self, widths: list[int]) -> None:
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(w_in, w_out))
        super().__init__(*layers)
        self.in_features = widths[0]
        self.out_features = widths[-1]


@register
class BottleNetCompressor(Compressor):
    """Learned bottleneck: encoder d -> w on the client, decoder w -> d on the server."""

    name = "bottlenet"

    def __init__(
        self,
        num_classes: int,
        hidden_size: int,
        *,
        compression: float = 0.1,
        width: int = 0,
        num_layers: int = 2,
        seed: int = 0,
    ) -> None:
        """Build both MLPs from ``seed`` (the global RNG is left untouched), so the client's
        and the server's copies of this compressor start from identical weights."""
        super().__init__(num_classes)
        self.hidden_size = int(hidden_size)
        self.width = bottleneck_width(self.hidden_size, compression, width)
        self.num_layers = int(num_layers)
        enc_widths = linear_widths(self.hidden_size, self.width, self.num_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = TokenMLP(enc_widths)  # (B, n, d) -> (B, n, w)
            self.decoder = TokenMLP(enc_widths[::-1])  # (B, n, w) -> (B, n, d)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> BottleNetCompressor:
        """Read ``compression``, ``bottlenet-width``, ``bottlenet-layers`` and ``seed``.

        ``hidden_size`` is the front's d. Until the registry passes it, a preset model's d is
        taken from ``adc_flwr.model.vit.PRESETS``; any other model needs it passed explicitly.
        """
        if hidden_size is None:
            if cfg.model not in PRESETS:
                raise ValueError(
                    f"bottlenet: the hidden size of model {cfg.model!r} is unknown here; "
                    "build_compressor must pass hidden_size (the front's d)"
                )
            hidden_size = PRESETS[cfg.model]["hidden_size"]
        return cls(
            num_classes,
            hidden_size,
            compression=cfg.compression,
            width=cfg.bottlenet_width,
            num_layers=cfg.bottlenet_layers,
            seed=cfg.seed,
        )

    @property
    def ratio(self) -> float:
        """Elements on the wire over uncompressed elements, ``w / d`` (up and down)."""
        return self.width / self.hidden_size

    def client_module(self) -> nn.Module:
        """The encoder; trains and averages with the front (prefix ``encoder``)."""
        return self.encoder

    def server_module(self) -> nn.Module:
        """The decoder; trains with the server back."""
        return self.decoder

    # ---- client ---------------------------------------------------------------------

    def _client_part(self, h: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """The encoder, ``(B, n, d) -> (B, n, w)``, once ``h`` is known to be d wide."""
        if h.shape[-1] != self.hidden_size:
            raise ValueError(
                f"bottlenet: expected the front's output (B, n, d={self.hidden_size}), got "
                f"{tuple(h.shape)}"
            )
        return super()._client_part(h, module)

    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """Wrap the encoder's output ``h`` (B, n, w) with hard labels; nothing to plan.

        Its gradient flows back through the encoder into the front.
        """
        return Packet(tensors={"act": h}, targets=labels.long(), soft_targets=False)

    # ---- server ---------------------------------------------------------------------

    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The received code ``(B, n, w)``; the base class then applies the decoder."""
        return tensors["act"]
