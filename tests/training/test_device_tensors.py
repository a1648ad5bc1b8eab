"""Tensors on devices and bf16, on a machine without CUDA.

- The codec: a tensor subclass whose ``.numpy()`` refuses as a CUDA tensor's does, so only a
  codec that goes through ``.cpu()`` passes; decoding onto ``meta`` shows the device argument.
- Compressors: on fake CUDA tensors (``FakeTensorMode``: shapes and devices, no data, and the
  same device checks as CUDA) where a method has no data-dependent step, on ``meta`` for
  two more, and for every method (ADC, PQ and K-means are data-dependent) a spy that fails
  on any tensor factory call in the project's code that does not name its device, or on a
  random generator that is not the CPU's (draws are made on the CPU and moved).
- bf16: the replay of a packet is exact on the CPU and the bf16 forward is within the
  tolerance README states of the fp32 one.

Choosing the device, and what refuses one: ``tests/training/test_device.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from adc_flwr.compression import Packet, available_methods, build_compressor
from adc_flwr.compression.kmeans import kmeans
from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit
from adc_flwr.training.device import autocast
from adc_flwr.training.evaluation import evaluate
from adc_flwr.training.modules import modules_state
from adc_flwr.wire.channel import Channel
from adc_flwr.wire.codec import (
    ReceivedPacket,
    grads_to_record,
    packet_to_record,
    record_to_grads,
    record_to_packet,
    state_to_record,
)
from clients.node_cache import client_setup
from strategies.lifecycle import build_strategy
from tests.support.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
B, N, D, C = 8, 17, 64, 10


# ---- the codec: through the CPU out, onto the worker's device in ------------------------------


class _OnGpu(torch.Tensor):
    """Stands in for a CUDA tensor where the codec is concerned: ``.numpy()`` refuses, as a
    CUDA tensor's does; ``.cpu()`` gives a plain CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy; use .cpu()")
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return torch.Tensor.detach(args[0])
        return super().__torch_function__(func, types, args, kwargs or {})


def _on_gpu(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_OnGpu)


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_codec_sends_device_tensors_through_the_cpu(wire: str) -> None:
    with pytest.raises(TypeError):  # the stand-in works: skipping .cpu() would fail
        _on_gpu(torch.ones(2)).numpy()
    act = torch.randn(B, N, D)
    idx = torch.randint(0, 300, (B, 5))
    packet = Packet({"act": _on_gpu(act), "idx": _on_gpu(idx)}, _on_gpu(torch.arange(B) % C))
    record = packet_to_record(packet, wire)
    arrays = {key: array.numpy() for key, array in record.items()}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    received = record_to_packet(record)
    assert torch.equal(received.tensors["idx"], idx)
    assert torch.allclose(received.tensors["act"], act, rtol=1e-2, atol=1e-2)
    grads = record_to_grads(grads_to_record({"act": _on_gpu(act)}, wire))
    assert torch.allclose(grads["act"], act, rtol=1e-2, atol=1e-2)
    state = {"w": _on_gpu(torch.randn(3, 4)), "n": _on_gpu(torch.tensor(7))}
    assert all(isinstance(a.numpy(), np.ndarray) for a in state_to_record(state).values())


def test_codec_decodes_onto_the_device_it_is_given() -> None:
    counts = torch.ones(3, C, dtype=torch.int64)  # soft labels
    packet = Packet({"act": torch.randn(B, N, D), "idx": torch.arange(B)}, counts, True)
    received = record_to_packet(packet_to_record(packet, "float32"), device="meta")
    act, idx = received.tensors["act"], received.tensors["idx"]
    assert act.device.type == idx.device.type == received.targets.device.type == "meta"
    assert act.is_leaf and act.requires_grad and not idx.requires_grad
    grads = record_to_grads(grads_to_record({"act": torch.randn(2, 3)}, "float32"), "meta")
    assert grads["act"].device.type == "meta"


def test_the_server_moves_a_received_packet_onto_its_device() -> None:
    from adc_flwr.training.workers import _move_received

    received = ReceivedPacket(
        {"act": torch.randn(B, N, D, requires_grad=True), "idx": torch.arange(B)},
        torch.arange(B),
        soft_targets=False,
    )
    same = received.tensors
    _move_received(received, torch.device("cpu"))
    assert received.tensors is same  # already there: untouched, the leaves are the same
    _move_received(received, torch.device("meta"))
    act = received.tensors["act"]
    assert act.device.type == received.targets.device.type == "meta"
    assert act.is_leaf and act.requires_grad and not received.tensors["idx"].requires_grad


# ---- compressors create what they need on their input's device --------------------------------


def _compressor(method: str, device: str | None = None) -> Any:
    cfg = RunConfig(method=method, compression=0.25, batch_size=B)
    compressor = build_compressor(cfg, C, hidden_size=D)
    return compressor if device is None else compressor.to(device)


def _wire(tensors: dict[str, torch.Tensor], grad: bool = True) -> dict[str, torch.Tensor]:
    """What the server receives: float32 leaves (``grad``: requiring grad) and int64."""
    return {
        k: t.detach().float().requires_grad_(grad) if t.is_floating_point() else t.long()
        for k, t in tensors.items()
    }


@pytest.mark.parametrize("method", ["none", "topk", "c3sl", "quant"])
def test_compressors_on_fake_cuda_tensors(method: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    compressor = _compressor(method)
    # no autograd on fake CUDA tensors: a CPU build of torch has no CUDA autograd device
    with torch.no_grad(), FakeTensorMode():
        batch = B - 1 if method == "c3sl" else B  # a short batch: C3-SL adds `valid`
        h = torch.randn(batch, N, D, device="cuda")
        labels = torch.zeros(batch, dtype=torch.long, device="cuda")
        packet = compressor.encode(h, labels, torch.rand(batch, N, device="cuda"), seed=3)
        made = {**packet.tensors, **packet.plan, "targets": packet.targets}
        assert {k: t.device.type for k, t in made.items()} == dict.fromkeys(made, "cuda")
        if method == "topk":  # its decode reads the shape tensor's values: not on fakes
            return
        wire = {k: t for k, t in _wire(packet.tensors, grad=False).items() if k != "valid"}
        out = compressor.decode(wire)
        sent = out if method == "quant" else wire["act"]  # what the gradient refers to
        grads = compressor.compress_grads({"act": torch.ones_like(sent)})
        back = compressor.decompress_grads(_wire(grads, grad=False), packet)
        assert out.device.type == "cuda" and back["act"].device.type == "cuda"


@pytest.mark.parametrize("method", ["random-topk", "bottlenet"])
def test_compressors_on_meta_tensors(method: str) -> None:
    compressor = _compressor(method, "meta")
    h = torch.empty(B, N, D, device="meta", requires_grad=True)
    labels = torch.zeros(B, dtype=torch.long, device="meta")
    packet = compressor.encode(h, labels, torch.empty(B, N, device="meta"), seed=3)
    assert {t.device.type for t in [*packet.tensors.values(), *packet.plan.values()]} == {"meta"}
    sent = packet.grad_tensors()
    torch.autograd.backward(list(sent.values()), [torch.ones_like(t) for t in sent.values()])
    assert h.grad is not None and h.grad.device.type == "meta"
    if method == "bottlenet":
        out, leaves = compressor.server_decode(_wire(packet.tensors))
        assert out.device.type == "meta" and leaves["act"].device.type == "meta"


_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
    torch.as_tensor, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace,
    torch.logspace, torch.eye, torch.scalar_tensor, torch.empty_strided,
}  # fmt: skip


class _FactorySpy(TorchFunctionMode):
    """Records tensor factory calls made from the project's own code without ``device=``."""

    def __init__(self) -> None:
        super().__init__()
        self.implicit: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and f"{ROOT}/adc_flwr/" in frame.f_code.co_filename:
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                self.implicit.append(f"{func.__name__} at {where}")
        return func(*args, **kwargs)


def test_every_tensor_the_project_makes_names_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    real_generator = torch.Generator
    generators: list[Any] = []

    def generator(device: Any = None) -> torch.Generator:
        generators.append(device)  # random draws are made on the CPU and moved
        return real_generator() if device is None else real_generator(device)

    monkeypatch.setattr(torch, "Generator", generator)
    spy = _FactorySpy()
    with spy:
        for method in available_methods():
            compressor = _compressor(method)
            for batch in (B, B - 1):  # a short batch too (C3-SL pads it)
                h = torch.randn(batch, N, D, requires_grad=True)
                labels = torch.arange(batch) % C
                attn = torch.rand(batch, N).softmax(-1)
                packet = compressor.encode(h, labels, attn, seed=5)
                replay = compressor.encode(h, labels, attn, plan=packet.plan, seed=5)
                record = packet_to_record(replay, "float32")
                received = record_to_packet(record)
                out, leaves = compressor.server_decode(received.tensors)
                out.sum().backward()
                grads = compressor.compress_grads({k: t.grad for k, t in leaves.items()})
                back = compressor.decompress_grads(
                    record_to_grads(grads_to_record(grads, "float32")), replay
                )
                sent = replay.grad_tensors()
                torch.autograd.backward([sent[k] for k in sent], [back[k] for k in sent])
        kmeans(torch.randn(3, 40, 4), 5, generator=torch.Generator().manual_seed(0))
        channel = Channel("awgn", (0.0, 10.0), seed=1)
        channel.apply_message_({"act": torch.randn(B, N, D), "idx": torch.arange(B)})
    assert spy.implicit == []
    assert generators and set(generators) == {None}


# ---- bf16 ------------------------------------------------------------------------------------

REPLAY_ATOL = 0.0  # a packet's replay on the CPU is exact (docs/devices.md)
BF16_RTOL = 2e-2  # bf16 front vs fp32 front: max |diff| over max |h|
BF16_LOSS_RTOL = 1e-3  # server loss on the same batch, method none


def _worker_and_server(tmp_path: Path, method: str, precision: str) -> tuple[Any, Any, Any]:
    cfg = tiny_config(tmp_path, method=method, batch_size=32, compression=0.25, precision=precision)
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    setup = client_setup(cfg, 0, 1)
    worker = setup.worker(modules_state(strategy.client_modules), None)
    return worker, strategy.server, setup


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_workers_name_every_device_too(tmp_path: Path, precision: str) -> None:
    """One split-learning step and an evaluation, as the apps run them, under the spy."""
    worker, server, setup = _worker_and_server(tmp_path, "adc", precision)
    spy = _FactorySpy()
    with spy:
        idx, seed = setup.batch_indices(0), setup.encode_seed(1, 0)
        packet = worker.forward_packet(idx, seed)
        step = server.step([record_to_packet(packet_to_record(packet, "float32"))])
        grads = record_to_grads(grads_to_record(step.grads[0], "float32"))
        worker.apply_grads(idx, seed, {k: v.cpu() for k, v in packet.plan.items()}, grads)
        test = ImageSplit(setup.data.test.images[:32], setup.data.test.labels[:32])
        evaluate({"front": worker.front}, server.back, test, setup.skeleton.spec, 16,
                 compressor=server.compressor, precision=precision)  # fmt: skip
    assert spy.implicit == []


def test_fp32_takes_no_autocast_at_all() -> None:
    assert type(autocast(torch.device("cpu"), "fp32")).__name__ == "nullcontext"
    with pytest.raises(ValueError, match=r"run-config key 'precision' = 'fp16': allowed values"):
        autocast(torch.device("cpu"), "fp16")


@pytest.mark.parametrize("method", ["adc", "none", "pq"])
def test_bf16_packet_replay_is_exact(tmp_path: Path, method: str) -> None:
    worker, server, setup = _worker_and_server(tmp_path, method, "bf16")
    idx, seed = setup.batch_indices(0), setup.encode_seed(1, 0)
    packet = worker.forward_packet(idx, seed)
    with torch.no_grad():  # what apply_grads recomputes, with the plan
        replay = worker._encode(idx, seed, plan=packet.plan)
    for key, sent in packet.tensors.items():
        assert sent.dtype == replay.tensors[key].dtype
        assert float((sent.double() - replay.tensors[key].double()).abs().max()) <= REPLAY_ATOL
    received = record_to_packet(packet_to_record(packet, "float32"))
    loss = server.step([received]).loss  # the server decodes and steps in bf16
    assert np.isfinite(loss)


def test_bf16_forward_is_within_tolerance_of_fp32(tmp_path: Path) -> None:
    results = {}
    for precision in ("fp32", "bf16"):
        worker, server, setup = _worker_and_server(tmp_path / precision, "none", precision)
        packet = worker.forward_packet(setup.batch_indices(0), setup.encode_seed(1, 0))
        loss = server.step([record_to_packet(packet_to_record(packet, "float32"))]).loss
        results[precision] = (packet.tensors["act"], loss)
    (h32, loss32), (h16, loss16) = results["fp32"], results["bf16"]
    assert h16.dtype == torch.float32  # compressors and the wire always get float32
    assert float((h16 - h32).abs().max() / h32.abs().max()) <= BF16_RTOL
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32)
