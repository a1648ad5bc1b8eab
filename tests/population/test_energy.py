"""Energy per client: joules by hand for one client's exchanges on the clock."""

from __future__ import annotations

import pytest

from adc_flwr.population.clock import SimClock, Turn
from adc_flwr.population.energy import LTE_RADIO, WIFI_RADIO, ClientEnergy
from adc_flwr.population.profiles import EDGE_CLASSES, UNIFORM, ClientProfile, Population

PHONE = ClientProfile("phone", 8.0, 16.0, 0.05, 10.0, 1.0, 0.0, "lte", 0.25)


def test_one_exchange_by_hand() -> None:
    clock = SimClock(Population([PHONE], 0), server_gflops=100.0)
    clock.exchange([Turn(0, 2_000_000, 1_000_000, 4e9)])
    down_s, compute_s, up_s = 16e6 / 16e6, 4e9 / 10e9, 8e6 / 8e6  # serialisation, device
    r = LTE_RADIO
    radio = (
        r.promotion_w * r.promotion_s  # the round's first transfer wakes the radio
        + r.down_w_per_mbps * 16
        + r.active_w * down_s  # 16 Mbit down
        + r.tail_w * compute_s  # the tail while it computes (0.4 s < 11.6 s)
        + r.up_w_per_mbps * 8
        + r.active_w * up_s  # 8 Mbit up
        + r.tail_w * r.tail_s  # the tail after its last transfer
    )
    assert clock.energy_j(0) == pytest.approx((4 * 0.25, radio))


def test_a_gap_longer_than_the_tail_pays_a_new_promotion() -> None:
    energy = ClientEnergy()
    energy.transfer(WIFI_RADIO, 0.0, 1.0, 0, up=True)
    energy.transfer(WIFI_RADIO, 11.0, 12.0, 0, up=True)  # 10 s idle: past WiFi's 0.24 s tail
    r = WIFI_RADIO
    expected = 2 * r.promotion_j + r.tail_j + 2 * r.active_w  # the tail capped at T_tail
    assert energy.radio_j == pytest.approx(expected)
    assert energy.radio_total_j(r) == pytest.approx(expected + r.tail_j)


def test_a_vanished_client_pays_its_download_and_a_tail() -> None:
    clock = SimClock(Population([PHONE], 0), server_gflops=100.0)
    seconds = clock.vanished(0, 2_000_000)
    r = LTE_RADIO
    expected = r.promotion_j + r.down_w_per_mbps * 16 + r.active_w * 1.0 + r.tail_j
    assert seconds == pytest.approx(1.05) and clock.energy_j(0) == pytest.approx((0.0, expected))


def test_every_class_has_a_radio_and_a_device_figure() -> None:
    assert {p.name: p.radio for p in EDGE_CLASSES} == {
        "fibre": "wifi",
        "5g": "lte",
        "lte": "lte",
        "iot": "lte",
    }
    assert (UNIFORM.radio, UNIFORM.j_per_gflop) == ("reference", 0.1)
    iot = next(p for p in EDGE_CLASSES if p.name == "iot")
    assert iot.j_per_gflop == pytest.approx(0.6056, abs=1e-4)  # 7.2 W / 11.889 GFLOP/s
