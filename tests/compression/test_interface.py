"""The base class's template methods: one shape check for every method, learned parts inside.

Callers never apply ``client_module()`` / ``server_module()`` themselves: ``encode``,
``decode``/``server_decode`` and ``eval_forward`` do, and must give bit for bit what the
callers used to compute (encoder-then-wrap, decoder-after-decode, decoder(encoder(h))).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adc_flwr.compression import Compressor, available_methods, build_compressor
from adc_flwr.compression.bottlenet import BottleNetCompressor
from adc_flwr.config import RunConfig
from adc_flwr.training.evaluation import evaluate
from strategies.lifecycle import build_strategy
from tests.support.helpers import front_batch, tiny_config

C = 10
B, N, D = 8, 5, 8  # B a multiple of C3-SL's R = round(1/0.25)


def _compressor(method: str) -> Compressor:
    return build_compressor(RunConfig(method=method, compression=0.25), C, hidden_size=D)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return front_batch(B, N, D, C, seed)


# ---- one check, one message, every method ---------------------------------------------------


BAD_BATCHES = {  # case -> (spoil (h, labels, cls_attn), the message after "<method>: ")
    "h 2-D": (
        lambda h, y, a: (h[:, :, 0], y, a),
        "expected a floating h of shape (B, n, d), got (8, 5) torch.float32",
    ),
    "h int": (
        lambda h, y, a: (h.long(), y, a),
        "expected a floating h of shape (B, n, d), got (8, 5, 8) torch.int64",
    ),
    "labels short": (
        lambda h, y, a: (h, y[:-1], a),
        "expected integer labels (B,)=(8,), got (7,) torch.int64",
    ),
    "labels float": (
        lambda h, y, a: (h, y.float(), a),
        "expected integer labels (B,)=(8,), got (8,) torch.float32",
    ),
    "cls_attn short": (
        lambda h, y, a: (h, y, a[:, :-1]),
        "expected cls_attn (B, n)=(8, 5), got (8, 4)",
    ),
}


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_base_class_rejects_a_bad_batch_with_one_message(method: str, case: str) -> None:
    comp = _compressor(method)
    comp.encode(*_batch())  # the good batch goes through
    spoil, tail = BAD_BATCHES[case]
    with pytest.raises(ValueError) as err:
        comp.encode(*spoil(*_batch()))
    assert str(err.value) == f"{method}: {tail}"


def test_every_method_is_covered() -> None:
    """The parametrisation above runs over the registry; make sure it is not empty."""
    assert set(available_methods()) >= {
        "none", "adc", "topk", "random-topk", "c3sl", "bottlenet", "quant", "pq",
    }  # fmt: skip


# ---- BottleNet++: the learned parts inside the template methods ------------------------------


def _bottlenet() -> BottleNetCompressor:
    comp = build_compressor(RunConfig(method="bottlenet", compression=0.25, seed=3), C, D)
    assert isinstance(comp, BottleNetCompressor)
    return comp


def test_bottlenet_encode_equals_encoder_then_wrap_bit_for_bit() -> None:
    comp = _bottlenet()
    h, labels, cls_attn = _batch(1)
    h_new = h.clone().requires_grad_(True)
    h_old = h.clone().requires_grad_(True)
    pkt = comp.encode(h_new, labels, cls_attn, seed=5)
    code = comp.client_module()(h_old)  # the old caller-side path: (B, n, w)
    assert set(pkt.tensors) == {"act"} and torch.equal(pkt.tensors["act"], code)
    assert torch.equal(pkt.targets, labels) and not pkt.soft_targets and pkt.plan == {}
    # the same gradient reaches h, and the encoder's weights, along both paths
    upstream = torch.randn_like(code)
    torch.autograd.backward(list(pkt.grad_tensors().values()), [upstream])
    new_w = [p.grad.clone() for p in comp.client_module().parameters()]
    comp.client_module().zero_grad(set_to_none=True)
    code.backward(upstream)
    assert torch.equal(h_new.grad, h_old.grad)
    for a, p in zip(new_w, comp.client_module().parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_bottlenet_server_decode_applies_the_decoder_after_the_leaves() -> None:
    comp = _bottlenet()
    code = torch.randn(B, N, comp.width).requires_grad_(True)
    out, leaves = comp.server_decode({"act": code})
    assert set(leaves) == {"act"} and leaves["act"] is code  # gradients go back at (B, n, w)
    assert torch.equal(out, comp.server_module()(code))  # the old caller-side decoder
    assert torch.equal(comp.decode({"act": code}), out)
    out.sum().backward()
    assert code.grad is not None and code.grad.shape == (B, N, comp.width)
    assert all(p.grad is not None for p in comp.server_module().parameters())


# ---- evaluation path -------------------------------------------------------------------------


def test_bottlenet_eval_forward_is_decoder_of_encoder() -> None:
    comp = _bottlenet()
    h = _batch(2)[0]
    expected = comp.server_module()(comp.client_module()(h))
    assert torch.equal(comp.eval_forward(h), expected)
    # a probed copy of the encoder (other weights) is used instead of the compressor's own
    probe = copy.deepcopy(comp.client_module())
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.5)
    got = comp.eval_forward(h, probe)
    assert torch.equal(got, comp.server_module()(probe(h)))
    assert not torch.equal(got, expected)


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "bottlenet"])
def test_eval_forward_is_identity_without_learned_parts(method: str) -> None:
    comp = _compressor(method)
    assert comp.client_module() is None and comp.server_module() is None
    h = _batch(3)[0]
    assert comp.eval_forward(h) is h


@torch.no_grad()
def _old_evaluate(modules, strategy) -> tuple[float, float]:
    """The evaluation loop as it was, with the caller applying decoder(encoder(h))."""
    front, back = modules["front"], strategy.server.back
    decoder, split = strategy.server.compressor.server_module(), strategy.evaluator.test_split
    front.eval()
    back.eval()
    correct, loss_sum, n = 0, 0.0, len(split.labels)
    for start in range(0, n, strategy.cfg.eval_batch_size):
        idx = torch.arange(start, min(start + strategy.cfg.eval_batch_size, n)).numpy()
        pixels, labels = strategy.evaluator.spec.batch(split, idx)
        h, _ = front(pixels, with_cls_attention=False)
        if "encoder" in modules:
            h = decoder(modules["encoder"](h))
        logits = back(h)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    front.train()
    back.train()
    return correct / n, loss_sum / n


@pytest.mark.parametrize("method", ["bottlenet", "adc"])
def test_evaluate_numbers_are_unchanged(tmp_path: Path, method: str) -> None:
    cfg = tiny_config(tmp_path, method=method, compression=0.25, eval_batch_size=24)
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    probe = copy.deepcopy(strategy.client_modules)  # e.g. a mid-round average: other weights
    with torch.no_grad():
        for module in probe.values():
            for p in module.parameters():
                p.mul_(1.5)
    for modules in (strategy.client_modules, probe):
        new = evaluate(
            modules,
            strategy.server.back,
            strategy.evaluator.test_split,
            strategy.evaluator.spec,
            cfg.eval_batch_size,
            compressor=strategy.server.compressor,
        )
        assert new == _old_evaluate(modules, strategy)
