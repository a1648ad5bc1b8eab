"""The two halves of one split-learning step, free of Flower, shared by the apps and the benchmarks.

``ClientWorker`` owns a front, its optimizer and compressor: it produces a packet for a batch
and later applies the server's gradients to it by recomputing that forward with the saved
plan (autograd graphs cannot survive between Flower messages). ``ServerWorker`` owns the back:
one forward/backward over the packets of all clients in a step, gradients per packet.

Both work on the device their module lives on: batches, received packets and gradients are
moved there, and ``precision = "bf16"`` autocasts the front and back forwards only (the
compressor, the loss and everything on the wire stay float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adc_flwr.compression import Compressor, Packet
from adc_flwr.data import ImageSplit
from adc_flwr.data.augment import Augment
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import ClientFront, ServerBack
from adc_flwr.training.device import autocast, module_device, to_device
from adc_flwr.training.modules import client_modules, modules_state
from adc_flwr.wire.channel import Channel

if TYPE_CHECKING:  # the codec imports Flower; the workers run without it (bench_gpu.py)
    from adc_flwr.wire.codec import ReceivedPacket


def step_seed(*parts: int) -> int:
    """A 63-bit seed derived from (run seed, round, partition, step, ...): distinct per step."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def front_forward(
    front: ClientFront, pixels: torch.Tensor, precision: str, *, with_cls_attention: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The front at ``precision``: ``h`` comes out float32 either way (what compressors and
    the wire take); the CLS-attention row is float32 already."""
    with autocast(pixels.device, precision):
        h, cls_attn = front(pixels, with_cls_attention=with_cls_attention)
    return (h if precision == "fp32" else h.float()), cls_attn


def back_forward(back: ServerBack, h: torch.Tensor, precision: str) -> torch.Tensor:
    """The back at ``precision``; float32 logits either way (the loss runs in float32)."""
    with autocast(h.device, precision):
        logits = back(h)
    return logits if precision == "fp32" else logits.float()


class ClientWorker:
    """One client's side of split learning: front forward, encode, and deferred backward."""

    def __init__(
        self,
        front: ClientFront,
        compressor: Compressor,
        optimizer: torch.optim.Optimizer,
        split: ImageSplit,
        spec: InputSpec,
        precision: str = "fp32",
        augment: Augment | None = None,
    ) -> None:
        self.front = front
        self.compressor = compressor
        self.optimizer = optimizer
        self.split = split
        self.spec = spec
        self.precision = precision
        self.augment = augment  # the training forward's only; the seed comes with each batch

    @property
    def device(self) -> torch.device:
        """Where the front lives, and so where batches and gradients are moved."""
        return module_device(self.front)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The client-side modules that train and are averaged: the front (+ learned encoder)."""
        return client_modules(self.front, self.compressor)

    def front_state(self) -> dict[str, torch.Tensor]:
        """Weights of every client-side module, flat, as they travel for model sync."""
        return modules_state(self.trainable_modules())

    def _encode(
        self,
        idx: np.ndarray,
        seed: int,
        plan: dict[str, torch.Tensor] | None,
        augment_seed: int | None = None,
    ) -> Packet:
        view = None
        if self.augment is not None:
            if augment_seed is None:
                raise ValueError("an augmented forward needs the batch's augment seed")
            augment = self.augment
            view = lambda images: augment(images, augment_seed)  # noqa: E731
        pixels, labels = self.spec.batch(self.split, idx, self.device, view)
        # (B, n, d), (B, n)
        h, cls_attn = front_forward(self.front, pixels, self.precision, with_cls_attention=True)
        assert cls_attn is not None
        return self.compressor.encode(h, labels, cls_attn, plan=plan, seed=seed)

    def forward_packet(self, idx: np.ndarray, seed: int, augment_seed: int | None = None) -> Packet:
        """Forward and encode a batch (no graph kept, only the plan); ``augment_seed``
        draws its augmentation (with ``augment`` set)."""
        with torch.no_grad():
            return self._encode(idx, seed, plan=None, augment_seed=augment_seed)

    def apply_grads(
        self,
        idx: np.ndarray,
        seed: int,
        plan: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        augment_seed: int | None = None,
    ) -> None:
        """Recompute the forward with ``plan`` (and the same augmented images),
        backpropagate ``grads``, step."""
        packet = self._encode(idx, seed, plan=plan, augment_seed=augment_seed)
        sent = packet.grad_tensors()
        received = self.compressor.decompress_grads(to_device(grads, self.device), packet)
        missing = sent.keys() - received.keys()
        if missing:
            raise ValueError(f"server returned no gradient for {sorted(missing)}")
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(sent)
        torch.autograd.backward(
            [sent[k] for k in names], [received[k].to(sent[k].device, sent[k].dtype) for k in names]
        )
        self.optimizer.step()


def split_loss(logits: torch.Tensor, targets: torch.Tensor, soft: bool) -> torch.Tensor:
    """Cross-entropy against hard labels, or against soft labels given as class counts."""
    if not soft:
        return F.cross_entropy(logits, targets)
    probs = targets.float() / targets.sum(dim=1, keepdim=True).clamp_min(1)  # (T, C)
    return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class ServerStep(NamedTuple):
    """One server step: its loss, gradients per packet, (samples, tokens) per packet."""

    loss: float
    grads: list[dict[str, torch.Tensor]]
    rows: list[tuple[int, int]]


class ServerWorker:
    """The server's side: one back step over the packets of all clients in a step."""

    def __init__(
        self,
        back: ServerBack,
        compressor: Compressor,
        optimizer: torch.optim.Optimizer,
        channel: Channel | None = None,
        precision: str = "fp32",
    ) -> None:
        self.back = back
        self.compressor = compressor
        self.optimizer = optimizer
        self.channel = channel  # None: clean; the server draws both directions' noise
        self.precision = precision

    @property
    def device(self) -> torch.device:
        """Where the back lives, and so where received packets are moved."""
        return module_device(self.back)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The back on a decoded activation, at the run's precision (float32 logits)."""
        return back_forward(self.back, h, self.precision)

    def step(self, packets: list[ReceivedPacket]) -> ServerStep:
        """Decode, forward all packets as one server batch, backward, step.

        Returns the loss, per packet the gradients w.r.t. its transmitted tensors, and the
        (samples, tokens) each packet fed the back (for the simulated clock). Packets of
        different token counts (clients with their own ξ) go through the back in one group
        per count; the loss is still the mean over every sample of the step.
        With a channel, each packet's floating wire tensors get uplink noise in place before
        decoding (they stay leaves), and each packet's gradients get downlink noise after
        ``compress_grads``: one SNR draw per message, per client and direction.
        """
        h_parts, target_parts, leaves, compressors = [], [], [], []
        for p in packets:
            _move_received(p, self.device)
            if self.channel is not None:
                self.channel.apply_message_(p.tensors)
            compressor = p.compressor or self.compressor
            h, grad_leaves = compressor.server_decode(p.tensors)  # (B_i, k_i, d)
            h_parts.append(h)
            target_parts.append(p.targets)
            leaves.append(grad_leaves)
            compressors.append(compressor)
        soft = packets[0].soft_targets
        if len({h.shape[1:] for h in h_parts}) == 1:
            logits = self.logits(torch.cat(h_parts))  # (sum B_i, C)
        else:  # logits keep their packet order: one back pass per token count
            groups: dict[torch.Size, list[int]] = {}
            for i, h in enumerate(h_parts):
                groups.setdefault(h.shape[1:], []).append(i)
            parts: list[torch.Tensor] = [h_parts[0].new_empty(0)] * len(h_parts)
            for members in groups.values():
                out = self.logits(torch.cat([h_parts[i] for i in members]))
                for i, chunk in zip(
                    members, out.split([len(h_parts[i]) for i in members]), strict=True
                ):
                    parts[i] = chunk
            logits = torch.cat(parts)
        loss = split_loss(logits, torch.cat(target_parts), soft)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        grads = [
            c.compress_grads({k: t.grad for k, t in g.items()})
            for c, g in zip(compressors, leaves, strict=True)
        ]
        if self.channel is not None:
            for g in grads:
                self.channel.apply_message_(g)
        rows = [(int(h.shape[0]), int(h.shape[1])) for h in h_parts]
        return ServerStep(float(loss.detach()), grads, rows)


def _move_received(packet: ReceivedPacket, device: torch.device) -> None:
    """Put a received packet on ``device`` in place; moved floating tensors stay leaves with
    their ``requires_grad`` (the server reads their ``.grad``). A no-op where they are."""
    if any(t.device != device for t in packet.tensors.values()):
        packet.tensors = {
            k: t if t.device == device else t.detach().to(device).requires_grad_(t.requires_grad)
            for k, t in packet.tensors.items()
        }
    if packet.targets.device != device:
        packet.targets = packet.targets.to(device)
