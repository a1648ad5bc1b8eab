"""The contract every registered compressor keeps, checked for each one (a new method is
checked the moment it registers), and for the example of README.md's "Add your own
compressor": an exact replay from the plan, the round trip through the codec, and gradients
that come back at the shape that was sent and reach the front's output."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adc_flwr.compression import Compressor, available_methods, build_compressor
from adc_flwr.compression import registry as registry_module
from adc_flwr.config import RunConfig
from adc_flwr.wire.codec import grads_to_record, packet_to_record, record_to_grads, record_to_packet
from tests.support.helpers import front_batch

README = Path(__file__).resolve().parents[2] / "README.md"
C = 10
B, N, D = 8, 5, 8  # B a multiple of C3-SL's R = round(1/0.25)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return front_batch(B, N, D, C, seed)


def keeps_the_contract(compressor: Compressor) -> None:
    """One client step's worth of the interface, as ClientWorker and ServerWorker use it."""
    h, labels, cls_attn = batch()
    with torch.no_grad():
        sent = compressor.encode(h, labels, cls_attn, seed=7)
    # the client's replay with the saved plan is the packet it sent, bit for bit
    h = h.clone().requires_grad_(True)
    replay = compressor.encode(h, labels, cls_attn, plan=sent.plan, seed=7)
    assert sent.tensors.keys() == replay.tensors.keys()
    for name, tensor in sent.tensors.items():
        assert torch.equal(tensor, replay.tensors[name].detach()), name
    # up through the codec; the server decodes an activation its back can take
    received = record_to_packet(packet_to_record(replay, "float32"))
    assert received.soft_targets == replay.soft_targets
    assert torch.equal(received.targets, replay.targets.long())
    activation, leaves = compressor.server_decode(received.tensors)
    assert activation.dim() == 3 and activation.shape[-1] == D
    assert activation.shape[0] <= B and activation.shape[1] <= N
    activation.square().mean().backward()
    assert leaves and all(leaf.grad is not None for leaf in leaves.values())
    # gradients down through the codec, at the shape of what was sent
    grads = compressor.compress_grads({k: leaf.grad for k, leaf in leaves.items()})
    returned = compressor.decompress_grads(
        record_to_grads(grads_to_record(grads, "float32")), replay
    )
    transmitted = replay.grad_tensors()
    assert transmitted.keys() <= returned.keys()
    names = sorted(transmitted)
    for name in names:
        assert returned[name].shape == transmitted[name].shape, name
    torch.autograd.backward([transmitted[k] for k in names], [returned[k] for k in names])
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_keeps_the_contract(method: str) -> None:
    keeps_the_contract(build_compressor(RunConfig(method=method, compression=0.25), C, D))


@pytest.fixture
def readme_compressor() -> Iterator[type[Compressor]]:
    """The README's example module, executed as written, registered for the test only."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Add your own compressor", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README.md's compressor example is missing"
    before = set(available_methods())
    exec(compile(code[1], "README.md", "exec"), {})
    registered = set(available_methods()) - before
    assert len(registered) == 1
    name = registered.pop()
    yield registry_module.get_compressor_class(name)
    del registry_module._REGISTRY[name]


def test_the_readme_example_is_a_method_that_keeps_the_contract(
    readme_compressor: type[Compressor],
) -> None:
    cfg = RunConfig(method=readme_compressor.name)
    compressor = build_compressor(cfg, C, D)
    assert isinstance(compressor, readme_compressor)
    keeps_the_contract(compressor)
