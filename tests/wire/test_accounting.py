"""Accounting: traffic sums from codec sizes, the ledger's views, and simulated time."""

from __future__ import annotations

import math

import pytest
import torch

from adc_flwr.compression.none import NoCompression
from adc_flwr.wire.accounting import Traffic, TrafficLedger
from adc_flwr.wire.codec import grads_to_record, packet_to_record, state_to_record
from adc_flwr.wire.sizes import uncompressed_act_nbytes


def test_traffic_sums_and_views() -> None:
    a = Traffic(100, 10, 50, 1000, 400)
    b = Traffic(bytes_up_act=20, bytes_down_grad=5, bytes_up_act_uncompressed=100)
    c = a + b
    assert c == Traffic(120, 10, 55, 1000, 500)
    assert a == Traffic(100, 10, 50, 1000, 400)  # + does not mutate
    assert (c.up, c.down, c.total) == (130, 55, 1185)
    assert c.compression_ratio == pytest.approx(120 / 500)
    a += b
    assert a == c
    assert c.as_dict() == {
        "bytes_up_act": 120,
        "bytes_up_targets": 10,
        "bytes_down_grad": 55,
        "bytes_model_sync": 1000,
        "compression_ratio": pytest.approx(0.24),
    }


def test_compression_ratio_is_nan_when_nothing_was_sent() -> None:
    assert math.isnan(Traffic().compression_ratio)
    assert math.isnan(Traffic(bytes_model_sync=10).compression_ratio)


def test_traffic_from_codec_records_matches_record_sizes() -> None:
    h = torch.randn(8, 5, 4)
    packet = NoCompression(num_classes=10).encode(h, torch.arange(8), torch.zeros(8, 5))
    up = Traffic.of_packet(packet_to_record(packet, "float32"), uncompressed_act_nbytes(8, 5, 4))
    assert up.compression_ratio == 1.0  # method `none` at float32 is the reference
    assert up.bytes_up_targets == 128 + 8 + len("y")  # npy header + 8 uint8 labels + key
    half = Traffic.of_packet(packet_to_record(packet, "float16"), uncompressed_act_nbytes(8, 5, 4))
    assert half.bytes_up_act == 128 + 8 * 5 * 4 * 2 + len("f:act")
    assert half.compression_ratio == pytest.approx((128 + 320 + 5) / (128 + 640 + 5))
    down = Traffic.of_grads(grads_to_record({"act": h}, "float32"))
    assert down.bytes_down_grad == up.bytes_up_act and down.up == 0
    weights = state_to_record({"w": torch.zeros(10)})
    assert Traffic.of_model_sync(weights, weights).bytes_model_sync == 2 * (128 + 40 + 3)


def _ledger() -> TrafficLedger:
    ledger = TrafficLedger()
    # round 1: clients 7 and 9; round 2: client 9
    ledger.add(1, 7, Traffic(bytes_up_act=10, bytes_up_act_uncompressed=40))
    ledger.add(1, 9, Traffic(bytes_up_act=20, bytes_up_act_uncompressed=40))
    ledger.add(1, 7, Traffic(bytes_down_grad=5))
    ledger.add(1, 7, Traffic(bytes_model_sync=1000))
    # round 2: client 9 only
    ledger.add(2, 9, Traffic(bytes_up_targets=3))
    return ledger


def test_ledger_totals_per_round_and_client() -> None:
    ledger = _ledger()
    assert ledger.client_round(2, 9) == Traffic(0, 3, 0, 0, 0)
    assert ledger.client_round(2, 7) == Traffic()
    with pytest.raises(KeyError, match="round 1 is not the current round"):
        ledger.client_round(1, 7)  # only the current round's rows are kept
    assert ledger.total() == Traffic(30, 3, 5, 1000, 80)
    assert ledger.mb_sent == pytest.approx(1038 / 1e6)


def test_ledger_views_are_copies() -> None:
    ledger = _ledger()
    view = ledger.total()
    view += Traffic(bytes_up_act=1_000_000)
    assert ledger.total().bytes_up_act == 30


def test_ledger_state_round_trip_survives_torch_weights_only(tmp_path) -> None:
    ledger = _ledger()
    torch.save(ledger.state_dict(), tmp_path / "s.pt")
    restored = TrafficLedger()
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.total() == ledger.total()
    assert restored.client_round(2, 9) == ledger.client_round(2, 9)
