"""Throughput series into mahimahi traces; synthetic swings; the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adc_flwr.population.link_series import (
    ATT_LTE_UPLINK_SPREAD,
    read_series,
    synthetic_series,
    to_mahimahi,
    write_mahimahi,
)
from adc_flwr.population.links import TraceError, read_link_trace

ROOT = Path(__file__).resolve().parents[2]


def test_a_series_becomes_a_trace_of_its_mean_and_length(tmp_path: Path) -> None:
    rates = [1.2, 0.0, 3.0, 0.05, 2.0]  # Mbit/s per second: 100, 0, 250, 4.17, 166.7 packets
    times = to_mahimahi(rates)
    assert times == sorted(times) and times[-1] == 5000  # repeats with the series' length
    per_second = np.bincount((np.array(times) - 1) // 1000, minlength=5)
    assert list(per_second[:3]) == [100, 0, 250]  # whole packets land in their second
    path = tmp_path / "t.down.gz"
    write_mahimahi(path, times)
    trace = read_link_trace(path)
    assert trace.times_ms == tuple(times)
    assert abs(trace.mean_mbps - np.mean(rates)) <= 1500 * 8 / 5 / 1e6  # one packet over 5 s


def test_synthetic_series_has_its_mean_and_spread_and_repeats_per_seed() -> None:
    rates = synthetic_series(6.3, 20_000, seed=3)
    assert rates.mean() == pytest.approx(6.3)
    p50, p90 = np.percentile(rates, [50, 90])
    assert p90 / p50 == pytest.approx(ATT_LTE_UPLINK_SPREAD, rel=0.05)
    lag1 = np.corrcoef(np.log(rates[:-1]), np.log(rates[1:]))[0, 1]
    assert lag1 == pytest.approx(0.8, abs=0.02)
    assert np.array_equal(rates, synthetic_series(6.3, 20_000, seed=3))
    assert not np.array_equal(rates, synthetic_series(6.3, 20_000, seed=4))
    with pytest.raises(ValueError, match="mean_mbps > 0"):
        synthetic_series(0.0, 10, seed=0)


def test_reading_a_series(tmp_path: Path) -> None:
    path = tmp_path / "cooked.tsv"
    path.write_text("0.0\t1.5\n0.5\t2.5\n1.0\t0.5\n", encoding="utf-8")
    assert read_series(path) == ([1.5, 2.5, 0.5], 500)
    path.write_text("0\t1\n1\t2\n5\t1\n", encoding="utf-8")
    with pytest.raises(TraceError, match="evenly spaced"):
        read_series(path)
    path.write_text("0\t1\nnoise\n", encoding="utf-8")
    with pytest.raises(TraceError, match="line 2"):
        read_series(path)
    for text, match in (
        ("0 1\ninf 2\n", "finite"),
        ("0 1\n0.0004 2\n0.0008 2\n", "whole number of"),
        ("0 1\n0.3333333 2\n0.6666667 2\n", "whole number of"),
    ):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(TraceError, match=match):
            read_series(path)


def test_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "lte.up.gz"
    command = [sys.executable, "-m", "adc_flwr.population.link_series"]
    done = subprocess.run(
        [*command, "synth", "--mean-mbps", "2", "--seconds", "30", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert read_link_trace(out).mean_mbps == pytest.approx(2.0, rel=1e-3)
    bad = subprocess.run(
        [*command, "convert", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "missing.tsv" in bad.stderr


def test_the_edge_traces_study_files_are_what_their_script_writes(tmp_path: Path) -> None:
    from adc_flwr.population.profile_csv import read_trace
    from simulations.edge_traces import TRACES, write_populations

    write_populations(tmp_path)
    for name in ("edge_traced.csv", "edge_static.csv", "lte.up.gz", "lte.down.gz", "iot.up.gz"):
        assert (tmp_path / name).read_bytes() == (TRACES / name).read_bytes(), name
    traced, static = read_trace(TRACES / "edge_traced.csv"), read_trace(TRACES / "edge_static.csv")
    assert [p.name for p in traced].count("lte") == 7 and len(traced) == 20
    for a, b in zip(traced, static, strict=True):  # the same means, exactly; links differ
        assert (a.uplink_mbps, a.downlink_mbps) == (b.uplink_mbps, b.downlink_mbps)
        assert (a.uplink_trace is not None) == (a.name in ("lte", "iot"))
        assert b.uplink_trace is None and b.downlink_trace is None
