"""What a run reads of a trace, and what it says back (issue 27, items 6, 8 and 9): physical
ranges for link traces, the profile-trace's partition column, ADC_IN_ROOT and special files,
and errors that quote a file's text only up to the offending token."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from adc_flwr.population import device_traces as dt
from adc_flwr.population import link_series
from adc_flwr.population.links import MAX_GAP_MS, TraceError, read_link_trace
from adc_flwr.population.profile_csv import read_trace
from adc_flwr.population.profiles import ProfileError
from tests.population.test_links import write_trace

HEADER = "name,uplink_mbps,downlink_mbps,latency_s,gflops,availability,dropout"
SECRET = "root:x:0:0:root:/root:/bin/bash"  # the first line of a file nobody meant to read


def profile_csv(path: Path, *rows: str, header: str = HEADER) -> Path:
    path.write_text("\n".join((header, *rows)) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("times", "line"),
    [([1, 10**15 + 1], 2), ([10**15], 1), ([5, 6, 6 + MAX_GAP_MS + 1, 7 + MAX_GAP_MS], 3)],
    ids=["middle", "first-from-0", "just-above"],
)
def test_a_gap_past_the_physical_bound_names_file_and_line(
    tmp_path: Path, times: list[int], line: int
) -> None:
    """A trace with one 10^15 ms gap once completed a run of 40 billion simulated hours."""
    path = write_trace(tmp_path / "gap.up", times)
    with pytest.raises(TraceError, match=rf"link trace {path} line {line}: \d+ ms without"):
        read_link_trace(path)


def test_a_gap_at_the_bound_is_a_link(tmp_path: Path) -> None:
    """ATT-LTE-driving.up (mahimahi's traces/) has a 78.3 s outage: recordings stay valid."""
    trace = read_link_trace(write_trace(tmp_path / "ok.up", [1, 78_320, 78_320 + MAX_GAP_MS]))
    assert trace.period_ms == 78_320 + MAX_GAP_MS


def test_a_mean_above_the_link_range_names_the_trace_file(tmp_path: Path) -> None:
    """8400 packets in one millisecond are 100.8 Gbit/s, beyond the profiles' 100 Gbit/s."""
    path = write_trace(tmp_path / "fast.down", [1] * 8400)
    with pytest.raises(TraceError, match=rf"link trace {path} line 8400: .*100800 Mbit/s"):
        read_link_trace(path)
    trace = profile_csv(
        tmp_path / "p.csv", "a,10,,0.01,10,1,0,fast.down", header=HEADER + ",downlink_trace"
    )
    with pytest.raises(ProfileError, match=rf"line 2, column 'downlink_trace': link trace {path}"):
        read_trace(trace)


def test_a_30_mb_single_line_is_one_line_naming_file_and_line_1(tmp_path: Path) -> None:
    """Python's int-digit limit once answered with no file named; a long line is refused
    before it is read whole."""
    path = tmp_path / "huge.up"
    path.write_bytes(b"7" * 30_000_000)
    with pytest.raises(TraceError) as info:
        read_link_trace(path)
    message = str(info.value)
    assert message.startswith(f"link trace {path} line 1: longer than 64 characters")
    assert len(message) < 300 and "\n" not in message


def test_the_partition_column_places_the_rows(tmp_path: Path) -> None:
    """A profiles.csv whose rows were reordered (a spreadsheet's sort) keeps each client's
    profile on its partition; ids that are not 0..n-1 once each are refused, named."""
    header = "partition," + HEADER
    path = profile_csv(
        tmp_path / "p.csv", "1,slow,1,1,0.01,1,1,0", "0,fast,90,90,0.01,9,1,0", header=header
    )
    assert [p.name for p in read_trace(path)] == ["fast", "slow"]
    for ids, line, cell in [
        ((0, 0), 3, "'0'"),
        ((0, 2), 3, "'2'"),
        (("0", "x"), 3, "'x'"),
        (("", "1"), 2, "''"),
    ]:
        rows = (f"{ids[0]},a,1,1,0.01,1,1,0", f"{ids[1]},b,1,1,0.01,1,1,0")
        bad = profile_csv(tmp_path / "bad.csv", *rows, header=header)
        with pytest.raises(
            ProfileError, match=rf"line {line}, column 'partition': {cell} is not one of 0..1"
        ):
            read_trace(bad)


def test_errors_quote_a_foreign_file_only_up_to_its_offending_token(tmp_path: Path) -> None:
    """A file that is no trace (here a passwd-like one) is named, not echoed: at most
    24 characters of its text appear in the error."""
    foreign = tmp_path / "passwd"
    foreign.write_text(f"{SECRET}\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    with pytest.raises(
        TraceError, match=r"line 1: 'root:x:0:0:root:/root:/b'\.\.\. is not"
    ) as link:
        read_link_trace(foreign)
    with pytest.raises(
        ProfileError, match=r"line 1, column 'root:x:0:0:root:/root:/b'\.\.\."
    ) as csv:
        read_trace(foreign)
    cell = "1" + "0" * 60 + " Mbit/s"
    bad = profile_csv(tmp_path / "p.csv", f"a,{cell},1,0.01,1,1,0")
    with pytest.raises(ProfileError, match=r"'10{23}'\.\.\. is not a number") as number:
        read_trace(bad)
    flash = tmp_path / "states.json"
    flash.write_text(json.dumps({"u" * 500: {"messages": SECRET + " " * 200 + "tail"}}))
    with pytest.raises(ProfileError) as states:
        dt.load_flash_availability(flash)
    for info in (link, csv, number, states):
        assert "/bin/bash" not in str(info.value) and "tail" not in str(info.value)
        assert "u" * 25 not in str(info.value)


def test_reads_stay_under_adc_in_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ADC_IN_ROOT set, a profile-trace or a link trace outside it (by a relative path,
    or a link out) is refused, named, and never read; inside, it is read."""
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (outside / "passwd").write_text(SECRET + "\n")
    (inside / "link.up").symlink_to(outside / "passwd")
    write_trace(inside / "ok.up", [1, 2])
    monkeypatch.setenv("ADC_IN_ROOT", str(inside))
    header = HEADER + ",uplink_trace"
    escapes = profile_csv(inside / "p.csv", "a,,1,0.01,1,1,0,../out/passwd", header=header)
    with pytest.raises(
        ProfileError,
        match=rf"line 2, column 'uplink_trace': link trace .*passwd: {outside / 'passwd'} "
        rf"lies outside ADC_IN_ROOT={inside}",
    ) as info:
        read_trace(escapes)
    linked = profile_csv(inside / "l.csv", "a,,1,0.01,1,1,0,link.up", header=header)
    with pytest.raises(ProfileError, match="lies outside ADC_IN_ROOT") as linked_info:
        read_trace(linked)
    for error in (info, linked_info):
        assert "root:x" not in str(error.value)
    with pytest.raises(ProfileError, match=rf"profile-trace {outside / 'p.csv'}: .* lies outside"):
        read_trace(profile_csv(outside / "p.csv", "a,1,1,0.01,1,1,0"))
    fine = profile_csv(inside / "fine.csv", "a,,1,0.01,1,1,0,ok.up", header=header)
    assert read_trace(fine)[0].uplink_trace is not None


def _returns_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What ``call()`` raised, if it returned within ``seconds``; fails the test if it
    blocks (a FIFO read waits for a writer forever: the thread is left behind, a daemon)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO as profile-trace or FedScale/FLASH input would block the run forever."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for call in (
        lambda: read_trace(fifo),
        lambda: dt.load_flash_availability(fifo),
        lambda: dt.load_fedscale_capacity(fifo),
    ):
        error = _returns_within(10, call)
        assert isinstance(error, ProfileError) and "is a FIFO" in str(error), error


def test_link_series_refuses_to_write_a_trace_a_run_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recording with a 16-minute outage converts to no file, one line on stderr."""
    series = tmp_path / "cooked.tsv"
    series.write_text("".join(f"{t} {1.0 if t in (0, 961) else 0.0}\n" for t in range(962)))
    out = tmp_path / "link.down"
    assert link_series.main(["convert", str(series), "--out", str(out)]) == 2
    assert "ms without a delivery opportunity" in capsys.readouterr().err
    assert not out.exists()
