"""Profiles with recorded links and energy figures: the CSV columns, seeded offsets, the clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adc_flwr.population.clock import SimClock, Turn
from adc_flwr.population.profile_csv import TRACE_COLUMNS, read_trace, run_profiles, write_profiles
from adc_flwr.population.profiles import ClientProfile, Population, ProfileError

HEADER = ",".join((*TRACE_COLUMNS, "uplink_trace", "downlink_trace", "radio", "j_per_gflop"))


def write_csv(tmp_path: Path, *rows: str) -> Path:
    (tmp_path / "traces").mkdir(exist_ok=True)
    (tmp_path / "traces" / "every-ms.up").write_text("1\n", encoding="ascii")  # 12 Mbit/s
    # bursty: 40 packets in the first 10 ms of each 100 ms, then 2 more at 100 ms
    bursty = [1 + i // 4 for i in range(40)] + [100, 100]
    (tmp_path / "traces" / "bursty.down").write_text("\n".join(map(str, bursty)) + "\n")
    path = tmp_path / "clients.csv"
    path.write_text("\n".join((HEADER, *rows)) + "\n", encoding="utf-8")
    return path


def test_trace_columns_name_files_relative_to_the_csv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "a,,,0.02,10,1,0,traces/every-ms.up,traces/bursty.down,lte,0.3",
        "b,12.0,5,0.02,10,1,0,traces/every-ms.up,,wifi,",
        "c,3,4,0.02,10,1,0,,,,",
    )
    a, b, c = read_trace(path)
    assert a.uplink_trace is not None and a.uplink_mbps == 12.0  # the trace's mean
    assert a.downlink_trace is not None
    assert a.downlink_mbps == pytest.approx(42 * 1500 * 8 / 0.1 / 1e6)
    assert (a.radio, a.j_per_gflop) == ("lte", 0.3)
    assert b.uplink_trace is a.uplink_trace and b.downlink_trace is None  # one read, shared
    assert (b.downlink_mbps, b.radio, b.j_per_gflop) == (5.0, "wifi", 0.1)  # reference J/GFLOP
    assert (c.uplink_trace, c.radio) == (None, "reference")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a,7,5,0.02,10,1,0,traces/every-ms.up,,,", "column 'uplink_mbps': 7.0 Mbit/s beside"),
        ("a,,5,0.02,10,1,0,traces/none.up,,,", "column 'uplink_trace': link trace"),
        ("a,,5,0.02,10,1,0,,,,", "column 'uplink_mbps': '' is not a number"),
        ("a,1,5,0.02,10,1,0,,,5g-nr,", "radio '5g-nr' is not one of"),
        ("a,1,5,0.02,10,1,0,,,,0", "j_per_gflop = 0.0 must be in"),
        ("a,1,5,0.02,10,1,0,,,,cheap", "column 'j_per_gflop': 'cheap' is not a number"),
    ],
)
def test_a_bad_trace_or_energy_cell_names_the_line_and_column(
    tmp_path: Path, row: str, message: str
) -> None:
    with pytest.raises(ProfileError, match="line 2") as caught:
        read_trace(write_csv(tmp_path, row))
    assert message in str(caught.value)


def test_each_partition_starts_at_its_own_seeded_offset(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "a,,,0.02,10,1,0,traces/every-ms.up,traces/bursty.down,,",
        "b,3,4,0.02,10,1,0,,,,",
    )
    profiles = run_profiles("uniform", 6, 5, path)
    offsets = [p.trace_offset_s for p in profiles]
    assert offsets == [p.trace_offset_s for p in run_profiles("uniform", 6, 5, path)]
    assert offsets[1::2] == [0.0, 0.0, 0.0]  # constant links have no offset
    traced = offsets[0::2]
    assert len(set(traced)) == 3 and all(0 <= o < 0.1 for o in traced)  # within the period
    assert traced != [p.trace_offset_s for p in run_profiles("uniform", 6, 6, path)][0::2]
    assert run_profiles("uniform", 4, 5, path)[2] == profiles[2]  # not the population's size


def test_profiles_csv_reads_back_as_the_same_clients(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,,,0.02,10,1,0,traces/every-ms.up,traces/bursty.down,lte,0.3")
    profiles = run_profiles("uniform", 3, 1, path)
    saved = tmp_path / "run" / "profiles.csv"
    write_profiles(saved, profiles)
    again = run_profiles("uniform", 3, 1, saved)  # absolute trace paths, the mean beside them
    assert again == profiles
    assert [dataclasses.replace(p, trace_offset_s=0.0) for p in profiles] == read_trace(saved)


def test_a_constant_trace_gives_the_clock_of_its_rate_within_one_opportunity_per_transfer(
    tmp_path: Path,
) -> None:
    path = write_csv(tmp_path, "t,,,0.02,10,1,0,traces/every-ms.up,traces/every-ms.up,,")
    traced = run_profiles("uniform", 3, 0, path)
    constant = [ClientProfile("c", 12.0, 12.0, 0.02, 10.0, 1.0, 0.0)] * 3
    clocks = [SimClock(Population(p, 0), server_gflops=50.0) for p in (traced, constant)]
    transfers = 0
    for step in range(30):
        turns = [Turn(p, 10_000 * (p + 1) + step, 3_333 * (step + 1), 1e8) for p in range(3)]
        for clock in clocks:
            clock.exchange(turns)
            clock.server_step(1e9)
        transfers += 2  # the slowest client's download and upload set each exchange
    assert abs(clocks[0].now - clocks[1].now) <= transfers * 1e-3
    assert clocks[0].now != clocks[1].now  # the trace is replayed, not swapped for its mean


def test_a_transfer_that_starts_in_a_trough_takes_longer(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "t,1,,0,10,1,0,,traces/bursty.down,,")
    (row,) = read_trace(path)
    burst = row.download_s(30_000, start_s=0.0)  # 20 packets within the burst
    trough = row.download_s(30_000, start_s=0.011)  # 2 at 100 ms, 18 in the next burst
    assert burst == pytest.approx(0.005) and trough == pytest.approx(0.105 - 0.011)


def test_a_row_without_a_trace_keeps_the_clock_of_before_traces_bit_for_bit() -> None:
    """The expression the clock used before recorded links existed, to the last bit, at any
    start time (the `same numbers` check of this change diffed whole runs too)."""
    profile = ClientProfile("c", 6.3, 17.4, 0.0275, 15.0, 1.0, 0.0, "lte", 0.3)
    for start in (0.0, 12.345, 1e5):
        clock = SimClock(Population([profile], 0), server_gflops=50.0, now=start)
        clock.exchange([Turn(0, 123_457, 98_765, 3.3e9)])
        before = (0.0275 + 123_457 * 8 / (17.4 * 1e6)) + (0.0275 + 98_765 * 8 / (6.3 * 1e6))
        assert clock.now == start + (before + 3.3e9 / (15.0 * 1e9))


def test_a_cell_past_csv_s_field_limit_names_its_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,1,5,0.02,10,1,0,,,,", "b" * 200_000 + ",1,5,0.02,10,1,0,,,,")
    with pytest.raises(ProfileError, match="line 3"):
        read_trace(path)
