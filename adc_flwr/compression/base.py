"""The one interface every split-point compressor implements (DESIGN.md section 2).

A compressor turns the client front's output into a :class:`Packet` (what goes on the wire,
plus what the client must remember to redo the same encoding), and turns the received
tensors back into an activation the server back can consume. Gradients travel back at the
shape of the transmitted tensors, so autograd through ``encode`` routes them to ``h``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig


@dataclass
class Packet:
    """What one client sends for one batch, and how to reproduce it.

    Attributes:
        tensors: named tensors that go on the wire. Floating tensors stay differentiable
            w.r.t. the front's output ``h``; integer tensors (indices, codes) carry no
            gradient.
        targets: ``(B,)`` int64 class labels when ``soft_targets`` is False, else
            ``(T, C)`` int64 per-class member counts (the server normalises each row to the
            mean one-hot, i.e. the soft label). Counts are exact and smaller on the wire.
        soft_targets: whether ``targets`` holds counts (soft labels) or hard labels.
        plan: client-side only, never sent: what ``encode(..., plan=plan)`` needs to
            recompute exactly the same packet (cluster ids, token indices, masks, seeds).
            Small tensors, kept in Flower's ``context.state`` between messages.
        anchors: client-side only, never sent: the differentiable tensors the server's
            gradients refer to, when these are not the floating wire tensors themselves
            (quantisation sends integer codes; its anchor is the straight-through
            dequantised activation). Empty: the floating wire tensors are the anchors.
    """

    tensors: dict[str, torch.Tensor]
    targets: torch.Tensor
    soft_targets: bool = False
    plan: dict[str, torch.Tensor] = field(default_factory=dict)
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)

    def grad_tensors(self) -> dict[str, torch.Tensor]:
        """The client tensors whose gradients come back from the server, by name."""
        if self.anchors:
            return dict(self.anchors)
        return {k: t for k, t in self.tensors.items() if t.is_floating_point() and t.requires_grad}


class Compressor(ABC):
    """Base class: encode on the client (training only), decode on the server.

    Subclasses set ``name`` and register themselves with
    :func:`adc_flwr.compression.registry.register`.
    """

    name: ClassVar[str]

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    @classmethod
    def from_config(
        cls, cfg: RunConfig, num_classes: int, *, hidden_size: int | None = None
    ) -> Compressor:
        """Build from the run config; methods with parameters override this.

        ``hidden_size`` is the front's output width d, for methods with learned parts sized
        by it (BottleNet++); the others ignore it.
        """
        return cls(num_classes)

    @abstractmethod
    def encode(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        cls_attn: torch.Tensor,
        plan: dict[str, torch.Tensor] | None = None,
        *,
        seed: int = 0,
    ) -> Packet:
        """Compress a batch.

        Args:
            h: ``(B, n, d)`` front output (CLS token first).
            labels: ``(B,)`` int64 class labels.
            cls_attn: ``(B, n)`` CLS-attention row of the last client block (detached).
            plan: a previous packet's ``plan``; when given, reproduce that packet exactly
                (same clusters, indices, masks) instead of deciding anew.
            seed: seeds any randomness of this encoding (K-means init, random masks);
                the caller varies it per step. Ignored when ``plan`` is given.
        """

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Server side: received tensors -> ``(B', k, d)`` activation for the server back."""

    def server_decode(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Server side, training: the activation and the leaves whose gradients go back.

        Default: the received floating tensors (leaves with ``requires_grad``) are the leaves,
        so gradients travel at the packet's shape. Methods whose wire tensors are not
        differentiable (integer codes) return the decoded activation as a fresh leaf instead,
        named like the client's ``Packet.anchors``.
        """
        leaves = {k: t for k, t in tensors.items() if t.is_floating_point() and t.requires_grad}
        return self.decode(tensors), leaves

    def client_module(self) -> nn.Module | None:
        """Learned client-side part (a bottleneck encoder): trains and averages with the front."""
        return None

    def server_module(self) -> nn.Module | None:
        """Learned server-side twin (e.g. the decoder); trained with the server back."""
        return None

    def compress_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server side: gradients to send back (default: as computed, at the packet's shape)."""
        return grads

    def decompress_grads(
        self, grads: dict[str, torch.Tensor], packet: Packet
    ) -> dict[str, torch.Tensor]:
        """Client side: received gradients -> one tensor per ``packet.grad_tensors()`` entry."""
        return grads
