"""Recorded links: mahimahi's delivery opportunities, against a literal replay and by hand."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from adc_flwr.population.links import PACKET_BYTES, LinkTrace, TraceError, read_link_trace
from adc_flwr.population.profiles import ClientProfile


def write_trace(path: Path, times: list[int]) -> Path:
    path.write_text("".join(f"{t}\n" for t in times), encoding="ascii")
    return path


def mahimahi_finish(times: list[int], start_ms: float, nbytes: int) -> int:
    """mm-link's queue replayed opportunity by opportunity: the packet arrives at
    floor(start) (mahimahi's clock is whole ms), every opportunity at or before that ms is
    burned first, each later one carries 1500 bytes, the schedule repeats shifted by its last
    timestamp."""
    arrival = int(np.floor(start_ms))
    left, base = nbytes, 0
    for index in itertools.count():
        j = index % len(times)
        if j == 0 and index:
            base += times[-1]
        at = base + times[j]
        if at <= arrival:
            continue
        left -= PACKET_BYTES
        if left <= 0:
            return at
    raise AssertionError("unreachable")


def test_transfers_end_where_a_literal_replay_of_mahimahi_ends() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        times = sorted(int(t) for t in rng.integers(0, 60, size=int(rng.integers(1, 12))))
        times[-1] = max(times[-1], 1)
        trace = LinkTrace("t", tuple(times))
        for _ in range(25):
            start = float(rng.uniform(0, 400)) if rng.random() < 0.7 else float(rng.integers(400))
            nbytes = int(rng.integers(1, 40 * PACKET_BYTES))
            assert trace.finish_ms(start, nbytes) == mahimahi_finish(times, start, nbytes)


def test_a_hand_worked_trace() -> None:
    trace = LinkTrace("t", (2, 2, 5))  # two packets at 2 ms, one at 5 ms; period 5 ms
    assert trace.mean_mbps == pytest.approx(3 * 1500 * 8 / 5e-3 / 1e6)  # 7.2 Mbit/s
    assert trace.finish_ms(0.0, 1500) == 2 and trace.finish_ms(0.0, 3000) == 2
    assert trace.finish_ms(0.0, 3001) == 5 and trace.finish_ms(0.0, 6000) == 7
    assert trace.finish_ms(2.0, 1) == 5  # the opportunities at the arrival ms are burned
    assert trace.finish_ms(5.0, 1) == 7  # ... the period's last one too
    assert trace.finish_ms(3.0, 0) == 3.0 and trace.transfer_s(1.0, 1) == pytest.approx(0.002)


def test_a_constant_trace_is_the_constant_rate_within_one_opportunity() -> None:
    """One opportunity every millisecond: 12 Mbit/s. A transfer ends within one delivery
    opportunity (1 ms) of what the constant 12 Mbit/s link gives, wherever it starts."""
    trace = LinkTrace("every-ms", (1,))
    assert trace.mean_mbps == pytest.approx(12.0)
    constant = ClientProfile("c", 12.0, 12.0, 0.0, 1.0, 1.0, 0.0)
    rng = np.random.default_rng(1)
    for start, nbytes in zip(rng.uniform(0, 1e4, 500), rng.integers(0, 10**7, 500), strict=True):
        exact = constant.upload_s(int(nbytes))
        assert abs(trace.transfer_s(start, int(nbytes)) - exact) < 1e-3


def test_reading_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "up.trace"
    path.write_text("3\n3\n\n10\n", encoding="ascii")  # a blank line is skipped
    trace = read_link_trace(path)
    assert trace.times_ms == (3, 3, 10) and trace.period_ms == 10
    assert read_link_trace(path) is trace  # read once: rows share it
    os.utime(path, ns=(1, 1))
    path.write_text("1\n2\n", encoding="ascii")
    assert read_link_trace(path).times_ms == (1, 2)  # changed on disk: read again


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5\n3\n", "line 2: 3 ms comes after 5 ms"),
        ("1\nfast\n", "line 2: 'fast' is not a whole number"),
        ("1\n-2\n", "line 2: '-2' is not a whole number"),
        ("1.5\n", "line 1: '1.5' is not a whole number"),
        ("", "no timestamps"),
        ("0\n0\n", "the last timestamp is 0 ms"),
    ],
)
def test_a_malformed_trace_is_refused_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.trace"
    path.write_text(text, encoding="ascii")
    with pytest.raises(TraceError, match=message.replace("(", r"\(")) as caught:
        read_link_trace(path)
    assert str(path) in str(caught.value)


def test_a_missing_or_binary_trace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot be read"):
        read_link_trace(tmp_path / "nowhere.trace")
    binary = tmp_path / "binary.trace"
    binary.write_bytes(b"\x80\x81\x00")
    with pytest.raises(TraceError, match="cannot be read as text"):
        read_link_trace(binary)


def test_a_path_that_is_no_regular_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is not a regular file"):
        read_link_trace(tmp_path)
    with pytest.raises(TraceError, match="cannot be read"):
        read_link_trace("a\0b")
    assert len(repr(LinkTrace("t", tuple(range(1, 100_000))))) < 200  # no dump of every ms
