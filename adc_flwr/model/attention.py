"""CLS-attention row of one ViT block, from the CLS query only.

ADC ranks tokens and pools samples by how much the CLS query of the last client block
attends to each token, averaged over heads: one row of length n per sample (CLS-to-CLS
included). The block's own SDPA kernel never exposes its attention weights, and the full
(B, heads, n, n) map would cost O(n²) memory for a row we need once. So we capture the
block's query and key projections as it runs (forward hooks, no extra projection of any
token) and recompute only the CLS row: O(B·n·d) work, no n×n tensor.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def cls_attention_row(q_cls: Tensor, keys: Tensor, *, num_heads: int, scaling: float) -> Tensor:
    """Softmax attention of the CLS query over all keys, mean over heads.

    Args:
        q_cls: (B, d) the CLS token's query projection (all heads concatenated).
        keys: (B, n, d) the key projection of every token, CLS first.
        num_heads: attention heads; d must be a multiple of it.
        scaling: the block's logit scale (head_dim ** -0.5 in ViT).

    Returns:
        (B, n) float32, detached; each row sums to 1. Computed in float32 from float32
        copies of the inputs even under ``torch.autocast`` (``precision = "bf16"``), which
        is switched off here: the same float32 inputs give the same row with or without it.
    """
    b, n, d = keys.shape
    if q_cls.shape != (b, d):
        raise ValueError(f"q_cls must be (B, d) = {(b, d)}, got {tuple(q_cls.shape)}")
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not a multiple of num_heads {num_heads}")
    head_dim = d // num_heads
    device_type = keys.device.type
    no_autocast = (
        torch.autocast(device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()  # meta tensors and the like: nothing to switch off
    )
    with torch.no_grad(), no_autocast:
        # float32 softmax whatever the model dtype, like HF's eager attention.
        q = q_cls.float().view(b, num_heads, head_dim)  # (B, h, hd)
        k = keys.float().view(b, n, num_heads, head_dim)  # (B, n, h, hd)
        logits = torch.einsum("bhc,bnhc->bhn", q, k) * scaling  # (B, h, n)
        return logits.softmax(dim=-1).mean(dim=1)  # (B, n)


class CLSAttentionProbe:
    """Records one attention module's CLS query and keys while it runs.

    Use as a context manager around the block's forward; the hooks exist only inside the
    ``with`` so a module that is copied, pickled or run without the probe carries nothing.
    The module needs ``q_proj``, ``k_proj`` (Linear over (B, n, d)), ``num_attention_heads``
    and ``scaling``, as HF ``ViTAttention`` has.
    """

    def __init__(self, attention: nn.Module) -> None:
        for name in ("q_proj", "k_proj", "num_attention_heads", "scaling"):
            if not hasattr(attention, name):
                raise TypeError(f"{type(attention).__name__} has no {name!r}; not a ViT attention")
        self.attention = attention
        self._q_cls: Tensor | None = None
        self._keys: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def _record_query(self, _module: nn.Module, _args: object, out: Tensor) -> None:
        self._q_cls = out[:, 0].detach()  # (B, d): only the CLS query is kept

    def _record_keys(self, _module: nn.Module, _args: object, out: Tensor) -> None:
        self._keys = out.detach()  # (B, n, d): a view of the block's own keys, no copy

    def __enter__(self) -> CLSAttentionProbe:
        self._q_cls = self._keys = None
        self._handles = [
            self.attention.q_proj.register_forward_hook(self._record_query),
            self.attention.k_proj.register_forward_hook(self._record_keys),
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def row(self) -> Tensor:
        """(B, n) float32 CLS-attention row of the recorded forward; frees the captures."""
        if self._q_cls is None or self._keys is None:
            raise RuntimeError("the probed attention module has not run inside the probe")
        q_cls, keys = self._q_cls, self._keys
        self._q_cls = self._keys = None
        return cls_attention_row(
            q_cls,
            keys,
            num_heads=int(self.attention.num_attention_heads),
            scaling=float(self.attention.scaling),
        )
