"""The server's inversion network: what crosses the cut -> the image it came from.

A learning-based inversion in the manner of He et al. (ACSAC 2019) and FORA (CVPR 2024): the
server trains a decoder on an auxiliary set it holds, whose images it passes through the
client's front and compressor itself (white-box: in SplitFed it holds the averaged front),
then applies the decoder to what clients send. The decoder takes a set of tokens, as many as
the packet carries and in the order it carries them (ADC keeps k of n, Top-K zeroes most
values): learned patch queries attend to the tokens, and each query becomes one patch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MAX_LINEAR_WEIGHTS = 2**24  # 64 MB of float32 (vit-cpu on 28 px: 0.85 M)


class InversionNet(nn.Module):
    """Tokens ``(B, k, d)``, ``k <= max_tokens`` -> images ``(B, C, S, S)`` in [0, 1]."""

    def __init__(
        self,
        hidden_size: int,
        max_tokens: int,
        *,
        image_size: int,
        patch_size: int,
        channels: int,
        width: int | None = None,
        heads: int = 4,
        layers: int = 2,
    ) -> None:
        super().__init__()
        width = width or min(256, max(32, 2 * hidden_size))  # 128 for the vit-cpu preset
        self.grid, self.patch, self.channels = image_size // patch_size, patch_size, channels
        self.embed = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        # where a token sits in the packet; the front's position embeddings are in its values
        self.slots = nn.Parameter(torch.randn(1, max_tokens, width) * 0.02)
        # patch p starts out looking for slot p + 1 (CLS first): the layout of a dense packet
        self.queries = nn.Parameter(self.slots.detach()[:, 1 : 1 + self.grid**2].clone())
        layer = nn.TransformerDecoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, channels * patch_size**2))
        # and a linear map from the whole packet: what a fixed layout needs, learned fast;
        # left out where it would be huge (224 px DeiT: n·d x C·S² is billions of weights)
        size = max_tokens * hidden_size * channels * image_size**2
        self.linear = (
            nn.Linear(max_tokens * hidden_size, channels * image_size**2)
            if size <= MAX_LINEAR_WEIGHTS
            else None
        )
        self.max_tokens = max_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        b, k, _ = tokens.shape
        memory = self.embed(tokens) + self.slots[:, :k]  # (B, k, w)
        queries = self.queries.expand(b, -1, -1)  # (B, P, w), P = grid²
        patches = self.head(self.decoder(queries, memory))  # (B, P, C·p·p)
        g, p, c = self.grid, self.patch, self.channels
        image = patches.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
        image = image.reshape(b, c, g * p, g * p)
        if self.linear is not None:
            flat = nn.functional.pad(tokens, (0, 0, 0, self.max_tokens - k)).flatten(1)  # (B, n·d)
            image = image + self.linear(flat).view(b, c, g * p, g * p)
        return torch.sigmoid(image)


def fit_inversion(
    net: InversionNet,
    tokens: Tensor,
    images: Tensor,
    *,
    epochs: int,
    generator: torch.Generator,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> float:
    """Train ``net`` to map ``tokens`` (N, k, d) to ``images`` (N, C, S, S) by mean squared
    error, with Adam and a cosine schedule; the order of examples comes from ``generator``.
    Returns the last epoch's mean loss."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * -(-len(tokens) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    net.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        order = torch.randperm(len(tokens), generator=generator)
        for start in range(0, len(tokens), batch_size):
            idx = order[start : start + batch_size]
            loss = (net(tokens[idx]) - images[idx]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(idx), seen + len(idx)
    net.eval()
    return loss_sum / max(1, seen)
