"""NoCompression: the activation and hard labels go through untouched, gradient is identity."""

from __future__ import annotations

import torch

from adc_flwr.compression import build_compressor
from adc_flwr.compression.none import NoCompression
from adc_flwr.config import RunConfig


def test_roundtrip_is_identity_with_hard_labels() -> None:
    h = torch.randn(6, 5, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    comp = NoCompression(num_classes=4)
    pkt = comp.encode(h, labels, torch.rand(6, 5), seed=7)
    assert set(pkt.tensors) == {"act"} and pkt.tensors["act"] is h
    assert not pkt.soft_targets and torch.equal(pkt.targets, labels)
    assert pkt.plan == {}
    assert comp.decode(pkt.tensors) is h


def test_gradient_passes_unchanged() -> None:
    h = torch.randn(3, 4, 2, requires_grad=True)
    pkt = NoCompression(2).encode(h, torch.tensor([0, 1, 0]), torch.rand(3, 4))
    grad = torch.randn(3, 4, 2)
    torch.autograd.backward(list(pkt.grad_tensors().values()), [grad])
    assert torch.equal(h.grad, grad)


def test_registered_as_none() -> None:
    comp = build_compressor(RunConfig(method="none"), num_classes=10)
    assert isinstance(comp, NoCompression) and comp.name == "none"
