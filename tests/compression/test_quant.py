"""Uniform quantisation: bit packing, error bounds, wire bytes, straight-through gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adc_flwr.compression import build_compressor
from adc_flwr.compression.quant import (
    QuantCompressor,
    num_bits,
    pack_bits,
    packed_width,
    quantize,
    unpack_bits,
)
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.wire.codec import (
    act_and_target_nbytes,
    grads_to_record,
    packet_to_record,
    record_nbytes,
    record_to_grads,
    record_to_packet,
)
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.support.helpers import front_copy, tiny_config, train_in_process

C = 10


def _batch(b: int = 32, n: int = 50, d: int = 64, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # tokens of different scales, so per-token and per-tensor ranges differ
    h = torch.randn(b, n, d, generator=g, dtype=dtype) * torch.rand(
        b, n, 1, generator=g, dtype=dtype
    )
    labels = torch.randint(0, C, (b,), generator=g)
    return h.requires_grad_(True), labels, torch.softmax(torch.randn(b, n, generator=g), -1)


# ---- bit packing ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trip_and_bytes_scale_with_bits(bits: int) -> None:
    for m in (1, 5, 8, 63, 64):
        codes = torch.randint(0, 1 << bits, (3, 2, m))
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 2, -(-m * bits // 8))
        assert torch.equal(unpack_bits(packed, bits, m), codes)
        assert torch.equal(unpack_bits(packed.long(), bits, m), codes)  # as the codec returns it


@pytest.mark.parametrize("bits", [3, 8, 12, 16])
def test_packing_is_an_lsb_first_bit_stream(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (7,), generator=torch.Generator().manual_seed(bits))
    stream = [(int(c) >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = [sum(stream[8 * i + j] << j for j in range(8)) for i in range(len(stream) // 8)]
    assert pack_bits(codes, bits).tolist() == expected


# ---- quantisation ---------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12, 16])
def test_error_is_at_most_half_a_step(granularity: str, bits: int) -> None:
    h, labels, attn = _batch(b=8, n=17, d=64, dtype=torch.float64)
    comp = QuantCompressor(C, bits=bits, granularity=granularity)
    pkt = comp.encode(h, labels, attn)
    deq = comp.decode(pkt.tensors)
    scale = pkt.tensors["scale"]  # (B, n, 1) or (1, 1, 1)
    assert scale.shape == ((8, 17, 1) if granularity == "token" else (1, 1, 1))
    err = (deq - h.detach()).abs()
    assert (err <= scale / 2 * (1 + 1e-9)).all()
    x = h.detach() if granularity == "token" else h.detach().reshape(1, 1, -1)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    # float64 h, float32 wire: scale/zero are rounded outward to float32 (rel. 1e-7)
    torch.testing.assert_close(scale.expand_as(lo), (hi - lo) / (2**bits - 1), rtol=1e-6, atol=0)
    assert err.max() > 0.3 * scale.max()  # the bound is attained in order of magnitude


def test_sixteen_bits_nearly_exact() -> None:
    h, labels, attn = _batch(b=8, n=17, d=64)
    comp = QuantCompressor(C, bits=16)
    deq = comp.decode(comp.encode(h, labels, attn).tensors)
    span = (h.amax(-1, keepdim=True) - h.amin(-1, keepdim=True)).detach()
    assert ((deq - h.detach()).abs() <= span / 65535 / 2 + 1e-6).all()
    torch.testing.assert_close(deq, h.detach(), rtol=0, atol=1e-4)


def test_constant_tokens_are_exact() -> None:
    h = torch.full((2, 3, 8), 0.7)
    h[1, 2] = -2.5
    comp = QuantCompressor(C, bits=2)
    pkt = comp.encode(h, torch.zeros(2, dtype=torch.long), torch.rand(2, 3))
    assert torch.equal(comp.decode(pkt.tensors), h)


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_server_decodes_exactly_what_the_client_meant_at_every_wire_dtype(wire_dtype: str) -> None:
    h, labels, attn = _batch(b=4, n=9, d=16)
    comp = QuantCompressor(C, bits=5, wire_dtype=wire_dtype)
    pkt = comp.encode(h, labels, attn)
    received = record_to_packet(packet_to_record(pkt, wire_dtype))
    act, _ = comp.server_decode(received.tensors)
    # scale/zero were rounded to the wire dtype before coding: no loss in transit
    assert torch.equal(act.detach(), comp.decode(pkt.tensors))
    assert torch.equal(pkt.anchors["act"].detach(), act.detach())  # the anchor's value too
    scale = pkt.tensors["scale"]
    assert ((act.detach() - h.detach()).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_bits_mapping_and_config() -> None:
    assert num_bits(0.1) == 3 and num_bits(0.25) == 8 and num_bits(0.5) == 16
    assert num_bits(1.0) == 16 and num_bits(0.01) == 1 and num_bits(0.2) == 6
    assert num_bits(0.1, quant_bits=12) == 12
    comp = build_compressor(RunConfig(method="quant", compression=0.1), C)
    assert isinstance(comp, QuantCompressor)
    assert (comp.bits, comp.granularity, comp.side_dtype) == (3, "token", torch.float32)
    cfg = RunConfig(method="quant", quant_bits=4, quant_granularity="tensor", wire_dtype="bfloat16")
    comp = build_compressor(cfg, C)
    assert (comp.bits, comp.granularity, comp.side_dtype) == (4, "tensor", torch.bfloat16)
    for kwargs, key in (({"bits": 0}, "quant-bits"), ({"bits": 17}, "quant-bits")):
        with pytest.raises(ValueError, match=key):
            QuantCompressor(C, **kwargs)
    with pytest.raises(ValueError, match="quant-granularity"):
        QuantCompressor(C, granularity="channel")


# ---- wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 16])
def test_achieved_compression_matches_the_bit_budget(granularity: str, bits: int) -> None:
    """B=32, n=50, d=64, float32 side information, bytes from the codec.

    Per tensor the level is b/32; per token each token adds a float32 scale and zero
    (2·32 bits per 64 values): (b + 1)/32. Headers (~130 bytes per array, 3 arrays) add
    at most ~3% at b=1.
    """
    h, labels, attn = _batch(b=32, n=50, d=64)
    pkt = QuantCompressor(C, bits=bits, granularity=granularity).encode(h, labels, attn)
    record = packet_to_record(pkt, "float32")
    assert set(record.keys()) == {"i:codes", "f:scale", "f:zero", "y"}
    codes = record["i:codes"].numpy()
    assert codes.dtype == np.uint8 and codes.shape == (32, 50, packed_width(64, bits))
    act, _ = act_and_target_nbytes(record)
    ratio = act / uncompressed_act_nbytes(32, 50, 64)
    level = bits / 32 if granularity == "tensor" else (bits + 1) / 32
    assert ratio == pytest.approx(level, rel=0.05)
    assert ratio >= level


def test_ambiguous_width_sends_d() -> None:
    """1 bit, d=63: 8 bytes per token could hold 57..64 codes, so d travels (0-d integer)."""
    h, labels, attn = _batch(b=2, n=3, d=63)
    comp = QuantCompressor(C, bits=1)
    pkt = comp.encode(h, labels, attn)
    assert int(pkt.tensors["d"]) == 63
    received = record_to_packet(packet_to_record(pkt, "float32"))
    act, _ = comp.server_decode(received.tensors)
    assert act.shape == (2, 3, 63)
    assert "d" not in comp.encode(*_batch(b=2, n=3, d=64)).tensors  # unambiguous: no extra


# ---- gradients ----------------------------------------------------------------------


def test_straight_through_anchor_and_quantised_gradients_round_trip() -> None:
    h, labels, attn = _batch(b=6, n=9, d=16)
    comp = QuantCompressor(C, bits=4)
    pkt = comp.encode(h, labels, attn)
    assert set(pkt.grad_tensors()) == {"act"}
    assert not any(t.requires_grad for t in pkt.tensors.values())  # codes/scales: no graph

    received = record_to_packet(packet_to_record(pkt, "float32"))
    act, leaves = comp.server_decode(received.tensors)
    assert act.is_leaf and act.requires_grad and leaves == {"act": act}
    weights = torch.randn(16)
    (act * weights).pow(2).sum().backward()
    sent = comp.compress_grads({k: t.grad for k, t in leaves.items()})
    assert set(sent) == {"codes", "scale", "zero"} and sent["codes"].dtype == torch.uint8
    record = grads_to_record(sent, "float32")
    assert record_nbytes(record) == act_and_target_nbytes(packet_to_record(pkt, "float32"))[0]

    grads = comp.decompress_grads(record_to_grads(record), pkt)
    assert grads["act"].shape == (6, 9, 16)
    g_scale = sent["scale"]
    assert ((grads["act"] - act.grad).abs() <= g_scale / 2 * (1 + 1e-6)).all()
    torch.autograd.backward([pkt.grad_tensors()["act"]], [grads["act"]])
    assert torch.equal(h.grad, grads["act"])  # straight through: unchanged


def test_quantize_is_deterministic_and_detached() -> None:
    h, _, _ = _batch(b=2, n=3, d=8)
    a = quantize(h, 3, "token")
    b = quantize(h, 3, "token")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(t.requires_grad for t in a)


# ---- through the in-process Flower grid ----------------------------------------------


def test_grid_step_changes_client_front(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, method="quant", quant_bits=2, local_steps=1)
    before: dict[str, torch.Tensor] = {}
    strategy, _ = train_in_process(cfg, 1, before_start=lambda s: before.update(front_copy(s)))
    after = strategy.client_modules["front"].state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("patch_embeddings" in k for k in changed)  # the gradient reached the first layer
    assert len(changed) > len(before) // 2


def test_grid_training_lowers_the_loss_and_counts_bytes(tmp_path: Path) -> None:
    """Two classes (pathological partition) so 12 steps visibly learn on a 2-core CPU."""
    cfg = tiny_config(
        tmp_path,
        method="quant",
        compression=0.1,  # 3 bits
        local_steps=12,
        lr=3e-3,
        partitioner="pathological",
        classes_per_client=2,
    )
    grid = InProcessGrid(client_module.app, 1, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    losses = RunDir(cfg.run_dir).read_metrics().query("kind == 'step'")["train_loss"].to_numpy()
    assert len(losses) == 12
    assert losses[-4:].mean() < losses[:4].mean() - 0.3
    # digits: B=16, n=17, d=64, per token: (3 + 1)/32 = 0.125, plus three ~130-byte headers
    assert summary["compression_ratio"] == pytest.approx(0.125, rel=0.06)
    assert summary["bytes_down_grad"] == summary["bytes_up_act"]
