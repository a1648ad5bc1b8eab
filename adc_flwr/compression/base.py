"""The one interface every split-point compressor implements (docs/design.md section 2).

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
from torch import Tensor, nn

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig


Plan = dict[str, Tensor]
"""What a client keeps to replay an encoding exactly: cluster ids, token indices, masks."""


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


_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


class Compressor(ABC):
    """Base class: encode on the client (training only), decode on the server.

    Callers use only the public template methods (:meth:`encode`, :meth:`decode`,
    :meth:`server_decode`, :meth:`eval_forward`); these check the batch once and run the
    method's learned parts (``client_module()`` before :meth:`_encode`, ``server_module()``
    after :meth:`_decode`), so no caller special-cases a method. Subclasses implement the
    hooks :meth:`_encode` and :meth:`_decode`, set ``name`` and register themselves with
    :func:`adc_flwr.compression.registry.register`.
    """

    name: ClassVar[str]
    # ``adaptive-compression``: None when ``compression`` sets no parameter of the method
    # (or it has learned parts sized by it); else the keys that would override ``compression``
    adaptive_overrides: ClassVar[tuple[str, ...] | None] = None

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

    # ---- client ---------------------------------------------------------------------

    def encode(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        cls_attn: torch.Tensor,
        plan: dict[str, torch.Tensor] | None = None,
        *,
        seed: int = 0,
    ) -> Packet:
        """Compress a batch: check its shapes, run the learned client part, then :meth:`_encode`.

        Args:
            h: ``(B, n, d)`` floating front output (CLS token first).
            labels: ``(B,)`` integer class labels.
            cls_attn: ``(B, n)`` CLS-attention row of the last client block (detached).
            plan: a previous packet's ``plan``; when given, reproduce that packet exactly
                (same clusters, indices, masks) instead of deciding anew.
            seed: seeds any randomness of this encoding (K-means init, random masks);
                the caller varies it per step. Ignored when ``plan`` is given.

        Raises ValueError naming the method when a shape or dtype is off.
        """
        self._check_batch(h, labels, cls_attn)
        return self._encode(self._client_part(h), labels, cls_attn, plan, seed=seed)

    def _check_batch(self, h: torch.Tensor, labels: torch.Tensor, cls_attn: torch.Tensor) -> None:
        """The checks every method needs, in one place so their messages agree."""
        if h.dim() != 3 or not h.is_floating_point():
            raise ValueError(
                f"{self.name}: expected a floating h of shape (B, n, d), got "
                f"{tuple(h.shape)} {h.dtype}"
            )
        b, n, _ = h.shape
        if labels.shape != (b,) or labels.dtype not in _INTEGER_DTYPES:
            raise ValueError(
                f"{self.name}: expected integer labels (B,)=({b},), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        if cls_attn.shape != (b, n):
            raise ValueError(
                f"{self.name}: expected cls_attn (B, n)=({b}, {n}), got {tuple(cls_attn.shape)}"
            )

    @abstractmethod
    def _encode(
        self, h: Tensor, labels: Tensor, cls_attn: Tensor, plan: Plan | None, *, seed: int
    ) -> Packet:
        """The method's encoding of a checked batch, as :meth:`encode` documents.

        ``h`` has been through the learned client part, if any (then ``(B, n, w)``).
        """

    # ---- server ---------------------------------------------------------------------

    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Server side: received tensors -> ``(B', k, d)`` activation for the server back."""
        return self._server_part(self._decode(tensors))

    @abstractmethod
    def _decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Received (wire-format) tensors -> the activation before the learned server part."""

    def server_decode(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Server side, training: the back's input and the leaves whose gradients go back.

        The leaves come from :meth:`_decode_with_leaves`; the learned server part, if any,
        runs after them, so its gradient reaches them (and it trains with the back).
        """
        h, leaves = self._decode_with_leaves(tensors)
        return self._server_part(h), leaves

    def _decode_with_leaves(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`_decode` and the leaves whose gradients go back.

        Default: the received floating tensors (leaves with ``requires_grad``) are the leaves,
        so gradients travel at the packet's shape. Methods whose wire tensors are not
        differentiable (integer codes) return the decoded activation as a fresh leaf instead,
        named like the client's ``Packet.anchors``.
        """
        leaves = {k: t for k, t in tensors.items() if t.is_floating_point() and t.requires_grad}
        return self._decode(tensors), leaves

    def row_sources(self, packet: Packet, batch_size: int) -> tuple[Tensor, Tensor]:
        """What each row of :meth:`server_decode`'s output stands for, for the privacy audit.

        Returns ``weights`` ``(B', B)``: decoded row ``j`` stands for the image
        ``Σ_i weights[j, i] · x_i`` (its merged target), and ``mixed`` ``(B', B)`` bool: the
        samples whose activations went into row ``j``'s wire content (a reconstruction is
        also compared with the best of them). Default: one row per sample, nothing mixed.
        """
        eye = torch.eye(batch_size, device=packet.targets.device)
        return eye, eye.bool()

    # ---- evaluation -----------------------------------------------------------------

    def eval_forward(self, h: torch.Tensor, client_part: nn.Module | None = None) -> torch.Tensor:
        """What the front's output ``(B, n, d)`` passes through at evaluation, uncompressed.

        The learned parts belong to the model the back was trained on, so they stay in the
        path (BottleNet++: decoder(encoder(h))); lossy steps do not. Identity (``h`` itself)
        for methods without learned parts. ``client_part``: a copy of ``client_module()``
        holding the weights to evaluate (e.g. an average being probed) instead of its own.
        """
        return self.eval_server(self.eval_client(h, client_part))

    def eval_client(self, h: torch.Tensor, client_part: nn.Module | None = None) -> torch.Tensor:
        """The client's half of :meth:`eval_forward` (federated evaluation sends its output)."""
        return self._client_part(h, client_part)

    def eval_server(self, z: torch.Tensor) -> torch.Tensor:
        """The server's half of :meth:`eval_forward`."""
        return self._server_part(z)

    # ---- learned parts --------------------------------------------------------------

    def to(self, device: torch.device | str) -> Compressor:
        """Move the learned parts to ``device`` (in place; returns self). Everything else a
        method creates follows its input's device, so this is all a worker has to move."""
        for module in (self.client_module(), self.server_module()):
            if module is not None:
                module.to(device)
        return self

    def client_module(self) -> nn.Module | None:
        """Learned client-side part (a bottleneck encoder): trains and averages with the front.

        For optimizers, weight sync and checkpoints; :meth:`encode` applies it.
        """
        return None

    def server_module(self) -> nn.Module | None:
        """Learned server-side twin (e.g. the decoder); trained with the server back.

        For the server optimizer and checkpoints; the decode methods apply it.
        """
        return None

    def _client_part(self, h: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """``module`` (default: ``client_module()``) applied to ``h``; ``h`` itself when there
        is none."""
        module = self.client_module() if module is None else module
        return h if module is None else module(h)

    def _server_part(self, h: torch.Tensor) -> torch.Tensor:
        """``server_module()`` applied to ``h``, or ``h`` itself when there is none."""
        module = self.server_module()
        return h if module is None else module(h)

    # ---- gradients ------------------------------------------------------------------

    def compress_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server side: gradients to send back (default: as computed, at the packet's shape)."""
        return grads

    def decompress_grads(
        self, grads: dict[str, torch.Tensor], packet: Packet
    ) -> dict[str, torch.Tensor]:
        """Client side: received gradients -> one tensor per ``packet.grad_tensors()`` entry."""
        return grads
