"""Client profiles: the mixes' statistics, seeding per partition, CSV traces, the population."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adc_flwr.population import profiles as prof
from adc_flwr.population.profile_csv import TRACE_COLUMNS, read_trace, run_profiles, write_profiles
from adc_flwr.population.profiles import (
    MIXES,
    ClientProfile,
    Population,
    ProfileError,
    assign_profiles,
)

HEADER = ",".join(TRACE_COLUMNS)


def profile(name: str = "x", availability: float = 1.0, dropout: float = 0.0) -> ClientProfile:
    return ClientProfile(name, 10.0, 20.0, 0.01, 5.0, availability, dropout)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8")
    return path


# ---- ClientProfile ----------------------------------------------------------------------


def test_times_match_a_hand_computation() -> None:
    p = ClientProfile(
        "x",
        uplink_mbps=2.0,
        downlink_mbps=8.0,
        latency_s=0.05,
        gflops=4.0,
        availability=1.0,
        dropout=0.0,
    )
    # 1 MB up at 2 Mbit/s: 8e6 bit / 2e6 bit/s = 4 s, plus 50 ms
    assert p.upload_s(1_000_000) == pytest.approx(4.05)
    # 1 MB down at 8 Mbit/s: 1 s, plus 50 ms
    assert p.download_s(1_000_000) == pytest.approx(1.05)
    # 1e10 FLOP at 4 GFLOP/s: 2.5 s
    assert p.compute_s(1e10) == pytest.approx(2.5)
    assert p.upload_s(0) == pytest.approx(0.05)  # latency is paid even for an empty message


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("uplink_mbps", 0.0),
        ("downlink_mbps", -1.0),
        ("latency_s", -0.001),
        ("gflops", 0.0),
        ("availability", 1.01),
        ("dropout", -0.1),
        ("gflops", float("nan")),
        ("uplink_mbps", float("inf")),
    ],
)
def test_profile_rejects_out_of_range_values(column: str, value: float) -> None:
    values = {c: getattr(profile(), c) for c in TRACE_COLUMNS}
    values[column] = value
    with pytest.raises(ProfileError, match=column):
        ClientProfile(**values)


# ---- the mixes --------------------------------------------------------------------------


def test_uniform_is_identical_always_reachable_never_drops() -> None:
    profiles = assign_profiles("uniform", 50, seed=3)
    assert len(profiles) == 50 and len(set(profiles)) == 1
    assert profiles[0].availability == 1.0 and profiles[0].dropout == 0.0
    population = Population(profiles, seed=3)
    for server_round in range(1, 6):
        assert population.reachable(server_round).all()
        assert all(population.dropout_exchange(server_round, p, 7) is None for p in range(50))


@pytest.mark.parametrize("mix", ["edge", "lognormal"])
def test_mix_repeats_for_a_seed_and_differs_across_seeds(mix: str) -> None:
    first = assign_profiles(mix, 200, seed=7)
    assert assign_profiles(mix, 200, seed=7) == first
    assert assign_profiles(mix, 200, seed=8) != first


@pytest.mark.parametrize("mix", ["edge", "lognormal"])
def test_partition_profile_does_not_depend_on_num_partitions(mix: str) -> None:
    small = assign_profiles(mix, 10, seed=11)
    large = assign_profiles(mix, 5000, seed=11)
    assert large[:10] == small
    assert assign_profiles(mix, 1, seed=11) == small[:1]


def test_edge_shares_match_the_stated_shares() -> None:
    assert sum(prof.EDGE_SHARES) == pytest.approx(1.0)
    counts = Counter(p.name for p in assign_profiles("edge", 10_000, seed=0))
    assert set(counts) == {c.name for c in prof.EDGE_CLASSES}
    for cls, share in zip(prof.EDGE_CLASSES, prof.EDGE_SHARES, strict=True):
        assert counts[cls.name] / 10_000 == pytest.approx(share, abs=0.02), cls.name


def test_edge_classes_are_ordered_and_median_uplink_is_lte() -> None:
    # fibre > 5G > LTE > IoT in uplink and device speed, each class with its own reliability
    ups = [c.uplink_mbps for c in prof.EDGE_CLASSES]
    flops = [c.gflops for c in prof.EDGE_CLASSES]
    assert ups == sorted(ups, reverse=True) and flops == sorted(flops, reverse=True)
    assert [c.name for c in prof.EDGE_CLASSES] == ["fibre", "5g", "lte", "iot"]
    population = Population(assign_profiles("edge", 10_000, seed=5), seed=5)
    assert population.median_uplink_mbps == prof.LTE.uplink_mbps


def test_lognormal_median_and_spread() -> None:
    profiles = assign_profiles("lognormal", 10_000, seed=1)
    up = np.array([p.uplink_mbps for p in profiles])
    down = np.array([p.downlink_mbps for p in profiles])
    gflops = np.array([p.gflops for p in profiles])
    assert np.median(up) == pytest.approx(3.286, rel=0.10)
    assert np.median(down) == pytest.approx(4.318, rel=0.10)
    assert np.median(gflops) == pytest.approx(prof.LOGNORMAL.gflops, rel=0.10)
    spread = np.percentile(up, 95) / np.percentile(up, 5)
    assert spread == pytest.approx(15.0, rel=0.15)
    assert np.percentile(gflops, 95) / np.percentile(gflops, 5) == pytest.approx(199 / 15, rel=0.15)
    sigma_link = prof.SIGMA_LINK  # ln(15) / (2 × 1.645)
    assert sigma_link == pytest.approx(np.log(15) / (2 * 1.6448536), rel=1e-6)
    # fixed parts, and a slow link is slow both ways
    assert {(p.latency_s, p.availability, p.dropout) for p in profiles} == {(0.025, 0.8, 0.05)}
    assert np.allclose(down / up, 4.318 / 3.286)


def test_unknown_mix_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ProfileError, match="profile-mix") as info:
        assign_profiles("wifi", 4, seed=0)
    assert all(m in str(info.value) for m in MIXES)


# ---- CSV traces -------------------------------------------------------------------------


def test_write_then_read_is_exact(tmp_path: Path) -> None:
    profiles = assign_profiles("lognormal", 25, seed=9) + assign_profiles("edge", 25, seed=9)
    path = tmp_path / "run" / "profiles.csv"
    write_profiles(path, profiles)
    extra = "radio,j_per_gflop,uplink_trace,downlink_trace,trace_offset_s"
    assert path.read_text().splitlines()[0] == f"partition,{HEADER},{extra}"
    assert read_trace(path) == profiles  # bit-identical floats
    assert [f.name for f in path.parent.iterdir()] == ["profiles.csv"]  # no temp file left


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "profiles.csv"
    write_profiles(path, [profile("old")])
    before = path.read_bytes()
    with pytest.raises(AttributeError):
        write_profiles(path, [profile("new"), object()])  # type: ignore[list-item]
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["profiles.csv"]


def test_trace_rows_wrap_and_mix_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER}\na,1,2,0,3,1,0\nb,4,5,0.1,6,0.5,0.5\nc,7,8,0,9,0,1\n")
    profiles = run_profiles("edge", 7, 0, path)
    assert [p.name for p in profiles] == ["a", "b", "c", "a", "b", "c", "a"]
    assert profiles[1] == ClientProfile("b", 4.0, 5.0, 0.1, 6.0, 0.5, 0.5)
    assert run_profiles("not-a-mix", 2, 0, str(path))[1].name == "b"


def test_trace_columns_in_any_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gflops,name,dropout,availability,latency_s,downlink_mbps,uplink_mbps\n"
        "3,pi,0.2,0.6,0.05,2,1\n\n",
    )
    assert read_trace(path) == [ClientProfile("pi", 1.0, 2.0, 0.05, 3.0, 0.6, 0.2)]


@pytest.mark.parametrize(
    ("text", "line", "column", "says"),
    [
        (
            f"{HEADER}\na,1,2,0,3,1,0\nb,fast,2,0,3,1,0\n",
            3,
            "uplink_mbps",
            "'fast' is not a number",
        ),
        (f"{HEADER}\na,0,2,0,3,1,0\n", 2, "uplink_mbps", "out of range"),
        (f"{HEADER}\na,1,2,0,3,1.5,0\n", 2, "availability", "out of range"),
        (f"{HEADER}\na,1,2,-1,3,1,0\n", 2, "latency_s", "out of range"),
        (f"{HEADER}\na,1,nan,0,3,1,0\n", 2, "downlink_mbps", "not finite"),
        (f"{HEADER}\na,1,2,0,inf,1,0\n", 2, "gflops", "not finite"),
        (f"{HEADER}\na,1,2,0,3,1,0\nb,1,2,0,3\n", 3, "availability", "5 cells"),
        (f"{HEADER}\n ,1,2,0,3,1,0\n", 2, "name", "empty"),
        (f"{HEADER},speed\na,1,2,0,3,1,0,9\n", 1, "speed", "unknown"),
        (f"{HEADER},name\na,1,2,0,3,1,0,a\n", 1, "name", "repeated"),
        (
            "name,uplink_mbps,downlink_mbps,latency_s,gflops,availability\na,1,2,0,3,1\n",
            1,
            "dropout",
            "missing",
        ),
    ],
)
def test_bad_trace_names_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: str, says: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        read_trace(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}," in message
    assert f"column {column!r}" in message and says in message


@pytest.mark.parametrize(("text", "line"), [("", 1), (f"{HEADER}\n", 2), (f"{HEADER}\n\n\n", 2)])
def test_empty_trace_is_an_error(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=f"line {line}") as info:
        run_profiles("uniform", 3, 0, path)
    assert str(path) in str(info.value)


def test_missing_trace_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"nowhere\.csv"):
        read_trace(tmp_path / "nowhere.csv")


# ---- Population -------------------------------------------------------------------------


def test_reachable_follows_availability() -> None:
    profiles = [profile("never", 0.0)] * 10 + [profile("always", 1.0)] * 10
    population = Population(profiles + [profile("half", 0.5)] * 10_000, seed=4)
    for server_round in range(1, 20):
        reachable = population.reachable(server_round)
        assert reachable.dtype == bool and reachable.shape == (10_020,)
        assert not reachable[:10].any() and reachable[10:20].all()
    assert population.reachable(1)[20:].mean() == pytest.approx(0.5, abs=0.03)


def test_reachable_is_deterministic_per_seed_and_round() -> None:
    profiles = [profile(availability=0.5)] * 500
    a, b = Population(profiles, seed=1), Population(profiles, seed=1)
    assert np.array_equal(a.reachable(3), b.reachable(3))
    assert np.array_equal(a.reachable(3), a.reachable(3))
    assert not np.array_equal(a.reachable(3), a.reachable(4))
    assert not np.array_equal(a.reachable(3), Population(profiles, seed=2).reachable(3))


def test_dropout_exchange_bounds_and_determinism() -> None:
    population = Population([profile("stays", dropout=0.0), profile("drops", dropout=1.0)], 6)
    seen = set()
    for server_round in range(1, 200):
        assert population.dropout_exchange(server_round, 0, 5) is None
        exchange = population.dropout_exchange(server_round, 1, 5)
        assert isinstance(exchange, int) and 0 <= exchange < 5
        assert exchange == Population(population.profiles, 6).dropout_exchange(server_round, 1, 5)
        seen.add(exchange)
    assert seen == set(range(5))  # every exchange can be the one that never returns
    assert population.dropout_exchange(1, 1, 1) == 0


def test_dropout_rate_is_the_profiles() -> None:
    population = Population([profile(dropout=0.3)] * 4000, seed=8)
    dropped = [population.dropout_exchange(2, p, 10) is not None for p in range(4000)]
    assert np.mean(dropped) == pytest.approx(0.3, abs=0.03)


def test_population_indexing_and_median() -> None:
    profiles = [
        ClientProfile(str(i), up, 1.0, 0.0, 1.0, 1.0, 0.0)
        for i, up in enumerate([1.0, 2.0, 3.0, 10.0])
    ]
    population = Population(profiles, seed=0)
    assert len(population) == 4 and population[2] is profiles[2]
    assert population.median_uplink_mbps == pytest.approx(2.5)
    with pytest.raises(IndexError):
        population[4]
    with pytest.raises(IndexError):
        population.dropout_exchange(1, -1, 3)
    with pytest.raises(ProfileError):
        Population([], seed=0)
