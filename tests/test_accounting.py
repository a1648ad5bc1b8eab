"""Accounting: traffic sums from codec sizes, the ledger's views, and simulated time."""

from __future__ import annotations

import math

import pytest
import torch

from adc_flwr.accounting import Traffic, TrafficLedger, round_sim_time, sim_time_s
from adc_flwr.codec import (
    grads_to_record,
    packet_to_record,
    state_to_record,
    uncompressed_act_nbytes,
)
from adc_flwr.compression.none import NoCompression


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
    # round 1: clients 7 and 9, two steps; model sync without a step
    ledger.add(1, 7, Traffic(bytes_up_act=10, bytes_up_act_uncompressed=40), step=0)
    ledger.add(1, 9, Traffic(bytes_up_act=20, bytes_up_act_uncompressed=40), step=0)
    ledger.add(1, 7, Traffic(bytes_down_grad=5), step=1)
    ledger.add(1, 7, Traffic(bytes_model_sync=1000))
    # round 2: client 9 only
    ledger.add(2, 9, Traffic(bytes_up_targets=3), step=0)
    return ledger


def test_ledger_totals_per_round_client_step() -> None:
    ledger = _ledger()
    assert ledger.rounds() == [1, 2]
    assert ledger.clients() == [7, 9] and ledger.clients(2) == [9]
    assert ledger.client_round(1, 7) == Traffic(10, 0, 5, 1000, 40)
    assert ledger.step_total(1, 0) == Traffic(bytes_up_act=30, bytes_up_act_uncompressed=80)
    assert ledger.step_total(1, 1).bytes_down_grad == 5
    assert ledger.step_total(1, 5) == Traffic()
    assert ledger.round_total(1) == Traffic(30, 0, 5, 1000, 80)
    assert ledger.client_total(9) == Traffic(20, 3, 0, 0, 40)
    assert ledger.total() == Traffic(30, 3, 5, 1000, 80)
    assert ledger.mb_sent == pytest.approx(1038 / 1e6)


def test_ledger_views_are_copies() -> None:
    ledger = _ledger()
    view = ledger.client_round(1, 7)
    view += Traffic(bytes_up_act=1_000_000)
    assert ledger.client_round(1, 7).bytes_up_act == 10


def test_ledger_state_round_trip_survives_torch_weights_only(tmp_path) -> None:
    ledger = _ledger()
    torch.save(ledger.state(), tmp_path / "s.pt")
    restored = TrafficLedger.from_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.total() == ledger.total()
    assert restored.step_total(1, 0) == ledger.step_total(1, 0)
    assert restored.client_round(2, 9) == ledger.client_round(2, 9)


def test_sim_time_hand_computed() -> None:
    # 2 s compute at factor 1.5; 1 MB up at 8 Mbit/s = 1 s; 0.5 MB down at 40 Mbit/s = 0.1 s;
    # 3 messages × 50 ms
    t = sim_time_s(
        2.0,
        1_000_000,
        500_000,
        compute_factor=1.5,
        bandwidth_up_mbps=8.0,
        bandwidth_down_mbps=40.0,
        latency_s=0.05,
        messages=3,
    )
    assert t == pytest.approx(3.0 + 1.0 + 0.1 + 0.15)


def test_sim_time_directions_use_their_own_bandwidth() -> None:
    kw = {"bandwidth_up_mbps": 1.0, "bandwidth_down_mbps": 100.0, "latency_s": 0.0}
    assert sim_time_s(0.0, 125_000, 0, **kw) == pytest.approx(1.0)
    assert sim_time_s(0.0, 0, 125_000, **kw) == pytest.approx(0.01)
    inf = {"bandwidth_up_mbps": math.inf, "bandwidth_down_mbps": math.inf, "latency_s": 0.2}
    assert sim_time_s(1.0, 10**9, 10**9, **inf) == pytest.approx(1.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bandwidth_up_mbps": 0.0},
        {"bandwidth_down_mbps": -1.0},
        {"latency_s": -0.1},
        {"compute_factor": -2.0},
    ],
)
def test_sim_time_rejects_bad_profiles(kwargs: dict) -> None:
    base = {"bandwidth_up_mbps": 10.0, "bandwidth_down_mbps": 10.0, "latency_s": 0.0}
    with pytest.raises(ValueError):
        sim_time_s(1.0, 10, 10, **{**base, **kwargs})


def test_round_sim_time_by_mode() -> None:
    times = [1.5, 4.0, 2.5]
    assert round_sim_time(times, "splitfed") == 4.0
    assert round_sim_time(times, "vanilla") == pytest.approx(8.0)
    assert round_sim_time([], "splitfed") == 0.0
    with pytest.raises(ValueError, match="sl-mode"):
        round_sim_time(times, "async")
