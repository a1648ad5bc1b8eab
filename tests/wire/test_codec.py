"""Codec: exact round trips per wire dtype, minimal integer dtypes, and byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adc_flwr.compression.base import Packet
from adc_flwr.compression.none import NoCompression
from adc_flwr.wire.codec import (
    act_and_target_nbytes,
    grads_to_record,
    packet_to_record,
    record_nbytes,
    record_to_grads,
    record_to_packet,
    record_to_state,
    state_to_record,
)
from adc_flwr.wire.sizes import uncompressed_act_nbytes


def _packet(h: torch.Tensor, **extra: torch.Tensor) -> Packet:
    return Packet(tensors={"h": h, **extra}, targets=torch.tensor([0, 3, 9, 1]))


@pytest.fixture
def h() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, 6, generator=g) * 3


def test_float32_round_trip_is_exact_and_grad_ready(h: torch.Tensor) -> None:
    leaf = h.clone().requires_grad_(True)
    received = record_to_packet(packet_to_record(_packet(leaf * 1.0), "float32"))
    out = received.tensors["h"]
    assert out.dtype == torch.float32 and out.is_leaf and out.requires_grad
    assert torch.equal(out.detach(), h)
    out.sum().backward()  # the server reads .grad from these leaves
    assert torch.equal(out.grad, torch.ones_like(h))
    assert leaf.grad is None  # the wire cut the client's graph


def test_float16_round_trip_is_fp16_rounding(h: torch.Tensor) -> None:
    record = packet_to_record(_packet(h), "float16")
    assert record["f:h"].dtype == "float16"
    out = record_to_packet(record).tensors["h"].detach()
    assert torch.equal(out, h.half().float())
    assert not torch.equal(out, h)  # really rounded, not carried at float32


def test_bfloat16_bits_match_torch_rounding(h: torch.Tensor) -> None:
    record = packet_to_record(_packet(h), "bfloat16")
    assert record["b:h"].dtype == "uint16"
    out = record_to_packet(record).tensors["h"]
    assert out.dtype == torch.float32 and out.requires_grad
    expected_bits = h.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(out.detach().to(torch.bfloat16).view(torch.int16), expected_bits)
    assert torch.equal(out.detach(), h.to(torch.bfloat16).float())


def test_bfloat16_special_values_survive() -> None:
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.5e38])
    out = record_to_grads(grads_to_record({"g": special}, "bfloat16"))["g"]
    assert torch.equal(
        out.to(torch.bfloat16).view(torch.int16), special.to(torch.bfloat16).view(torch.int16)
    )


def test_float16_overflow_is_an_error_not_inf() -> None:
    with pytest.raises(ValueError, match=r"'h'.*float16"):
        packet_to_record(_packet(torch.full((4, 1, 1), 1e5)), "float16")


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([0, 255], "uint8"),
        ([0, 256], "uint16"),
        ([3, 65_535], "uint16"),
        ([0, 65_536], "uint32"),
        ([0, 2**32], "uint64"),
        ([-1, 127], "int8"),
        ([-129, 5], "int16"),
        ([-1, 40_000], "int32"),
        ([-(2**40), 0], "int64"),
        ([], "uint8"),
    ],
)
def test_integer_tensors_use_smallest_dtype(values: list[int], dtype: str) -> None:
    idx = torch.tensor(values, dtype=torch.int64)
    record = packet_to_record(_packet(torch.zeros(4, 1, 1), idx=idx), "float32")
    assert record["i:idx"].dtype == dtype
    out = record_to_packet(record).tensors["idx"]
    assert out.dtype == torch.int64 and not out.requires_grad
    assert torch.equal(out, idx)


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_scalars_and_transposed_tensors_keep_their_shape(wire: str) -> None:
    m = torch.arange(12.0).reshape(3, 4)
    grads = {"scale": torch.tensor(2.5), "zero_point": torch.tensor(-3), "mT": m.t()}
    out = record_to_grads(grads_to_record(grads, wire))
    assert out["scale"].shape == () and out["scale"].item() == 2.5
    assert out["zero_point"].shape == () and out["zero_point"].item() == -3
    assert torch.equal(out["mT"], m.t())


def test_bool_mask_round_trips_as_bool() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    out = record_to_grads(grads_to_record({"m": mask}, "float16"))["m"]
    assert out.dtype == torch.bool and torch.equal(out, mask)


def test_hard_targets_smallest_unsigned_and_flag() -> None:
    labels = torch.tensor([0, 3, 999, 1])
    record = packet_to_record(Packet({"h": torch.zeros(4, 2, 2)}, labels), "float32")
    assert record["y"].dtype == "uint16" and "ys" not in record
    received = record_to_packet(record)
    assert received.soft_targets is False
    assert received.targets.dtype == torch.int64 and torch.equal(received.targets, labels)


def test_soft_flag_survives_from_record_alone() -> None:
    counts = torch.tensor([[3, 0, 1], [0, 2, 0]])
    packet = Packet({"h": torch.zeros(2, 2, 2)}, counts, soft_targets=True)
    record = packet_to_record(packet, "bfloat16")
    assert record["ys"].dtype == "uint8" and "y" not in record
    received = record_to_packet(record)
    assert received.soft_targets is True
    assert torch.equal(received.targets, counts) and received.targets.dtype == torch.int64


def test_bad_targets_are_rejected() -> None:
    h = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match="hard labels"):
        packet_to_record(Packet({"h": h}, torch.tensor([[1, 0]])), "float32")
    with pytest.raises(ValueError, match="soft-label counts"):
        packet_to_record(Packet({"h": h}, torch.tensor([1, 0]), soft_targets=True), "float32")
    with pytest.raises(ValueError, match="non-negative"):
        packet_to_record(Packet({"h": h}, torch.tensor([-100, 0])), "float32")


@pytest.mark.parametrize("fn", ["packet", "grads", "state"])
def test_unknown_wire_dtype_names_the_key(fn: str) -> None:
    t = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match="wire-dtype"):
        if fn == "packet":
            packet_to_record(_packet(t), "float64")
        elif fn == "grads":
            grads_to_record({"h": t}, "int8")
        else:
            state_to_record({"w": t}, "fp16")


def test_nbytes_is_count_bytes_and_scales_with_dtype() -> None:
    packet = _packet(torch.randn(4, 197, 192), idx=torch.arange(50))
    sizes = {}
    for wire in ("float32", "float16", "bfloat16"):
        record = packet_to_record(packet, wire)
        act, tgt = act_and_target_nbytes(record)
        assert record_nbytes(record) == record.count_bytes() == act + tgt
        expected = sum(len(a.data) + len(k) for k, a in record.items())
        assert record_nbytes(record) == expected
        assert tgt == len(record["y"].data) + len("y")
        sizes[wire] = act
    assert sizes["float16"] == sizes["bfloat16"]
    assert 0.49 < sizes["float16"] / sizes["float32"] < 0.51


def test_grads_round_trip() -> None:
    grads = {"h": torch.randn(3, 4, 5), "vals": torch.randn(7).double()}
    out = record_to_grads(grads_to_record(grads, "float32"))
    assert set(out) == {"h", "vals"}
    assert torch.equal(out["h"], grads["h"])
    assert out["vals"].dtype == torch.float32 and torch.equal(out["vals"], grads["vals"].float())
    assert not out["h"].requires_grad


def test_state_dict_round_trip_loads_into_module() -> None:
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    src[1].num_batches_tracked.fill_(7)
    record = state_to_record(src.state_dict())
    assert all(a.dtype == "float32" for k, a in record.items() if k.startswith("f:"))
    state = record_to_state(record)
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    dst.load_state_dict(state)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_record_with_foreign_key_is_rejected() -> None:
    record = grads_to_record({"h": torch.zeros(2)}, "float32")
    record["weird"] = record["f:h"]
    with pytest.raises(ValueError, match="weird"):
        record_to_grads(record)


@pytest.mark.parametrize("shape", [(1, 1, 1), (64, 197, 192), (8, 17, 768), (0, 5, 3)])
def test_uncompressed_act_nbytes_is_exact(shape: tuple[int, int, int]) -> None:
    """It is what method `none` puts on the wire at float32, header and key included."""
    b, n, _ = shape
    packet = NoCompression(num_classes=10).encode(
        torch.zeros(shape), torch.zeros(b, dtype=torch.int64), torch.zeros(b, n)
    )
    act, _ = act_and_target_nbytes(packet_to_record(packet, "float32"))
    assert uncompressed_act_nbytes(*shape) == act
    assert act > np.prod(shape) * 4  # header and key are counted too
