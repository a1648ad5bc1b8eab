"""Third-party device traces: FedScale capacity (a pickle, loaded without globals) and FLASH
availability (JSON state messages) into a profile-trace CSV, on small hand-made files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from adc_flwr.population import device_traces as dt
from adc_flwr.population.profile_csv import read_trace
from adc_flwr.population.profiles import ProfileError

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2020, 1, 31, 8, 0, 0)


def fedscale(tmp_path: Path, data: object, name: str = "capacity") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data))
    return path


def line(minute: float, state: str) -> str:
    return f"{(T0 + timedelta(minutes=minute)):%Y-%m-%d %H:%M:%S}\t{state}"


def flash(tmp_path: Path, records: dict[str, object], text: str | None = None) -> Path:
    path = tmp_path / "state_traces.json"
    path.write_text(json.dumps(records) if text is None else text, encoding="utf-8")
    return path


# a device locked, charging and on WiFi from minute 10 to 40 of a 60-minute trace: 0.5
HALF = [
    line(0, "wifi"),
    line(0, "battery_charged_on"),
    line(5, "87%"),
    line(10, "screen_lock"),
    line(40, "screen_unlock"),
    line(60, "screen_on"),
]


def cli(*args: str) -> int:
    return dt.main([str(a) for a in args])


# ---- FedScale capacity ---------------------------------------------------------------------


def test_fedscale_values_are_converted_and_read_back(tmp_path: Path) -> None:
    # 50 ms inference -> 0.15 s per training sample; 3 GFLOP / 0.15 s = 20 GFLOP/s
    path = fedscale(
        tmp_path,
        {
            3: {"computation": 100, "communication": 2000.0},
            1: {"computation": 50.0, "communication": 6100.0},
        },
    )
    out = tmp_path / "profiles.csv"
    assert (
        cli(
            "--fedscale",
            path,
            "--reference-gflop",
            3.0,
            "--out",
            out,
            "--latency-s",
            0.05,
            "--availability",
            0.9,
            "--dropout",
            0.1,
        )
        == 0
    )
    first, second = read_trace(out)
    assert (first.name, second.name) == ("fedscale-1", "fedscale-3")
    assert first.gflops == pytest.approx(20.0) and second.gflops == pytest.approx(10.0)
    assert (first.uplink_mbps, first.downlink_mbps) == (6.1, 6.1)
    assert (second.uplink_mbps, second.downlink_mbps) == (2.0, 2.0)
    assert (first.latency_s, first.availability, first.dropout) == (0.05, 0.9, 0.1)
    assert dt.fedscale_gflops(50.0, 3.0) == first.gflops  # the CSV is exact


def test_seeded_selection_is_reproducible(tmp_path: Path) -> None:
    ids = list(range(100, 0, -1))
    picks = dt.choose(ids, 10, seed=0)
    assert picks == dt.choose(ids, 10, seed=0) != dt.choose(ids, 10, seed=1)
    assert len(set(picks)) == 10 and set(picks) <= set(ids)
    assert dt.choose(ids, None, seed=0) == sorted(ids)
    assert dt.choose(["10", "9", "b", "a"], None, seed=0) == ["9", "10", "a", "b"]
    with pytest.raises(ProfileError, match="--clients 101: the trace has 100"):
        dt.choose(ids, 101, seed=0)
    path = fedscale(tmp_path, {i: {"computation": 10.0 + i, "communication": 1e3} for i in ids})
    texts = []
    for name in ("a.csv", "b.csv"):
        assert (
            cli(
                "--fedscale",
                path,
                "--reference-gflop",
                1,
                "--clients",
                5,
                "--seed",
                7,
                "--out",
                tmp_path / name,
            )
            == 0
        )
        texts.append((tmp_path / name).read_text())
    assert texts[0] == texts[1] and len(read_trace(tmp_path / "a.csv")) == 5


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_a_global_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = fedscale(tmp_path, {1: _Planted(marker)})
    with pytest.raises(ProfileError, match=r"names the global (posix|os)\.system; refused"):
        dt.load_fedscale_capacity(path)
    assert not marker.exists()
    path = fedscale(tmp_path, {1: {"computation": 1.5, "communication": _Planted(marker)}})
    with pytest.raises(ProfileError, match="refused"):
        dt.load_fedscale_capacity(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"client,computation,communication\n1,50,6100\n", "is not a pickle"),
        (bytes(range(7, 200, 3)), "is not a pickle"),
        (b"", "is not a pickle"),
        ([1, 2], "holds a list, not a dict"),
        ({}, "holds no clients"),
        ({"x": {"computation": 1.0, "communication": 1.0}}, "client id 'x' is not an int"),
        ({4: [50.0, 6100.0]}, "client 4: list, not a dict"),
        ({5: {"communication": 6100.0}}, "client 5: no 'computation'"),
        ({6: {"computation": 50.0}}, "client 6: no 'communication'"),
        ({7: {"computation": "50", "communication": 1.0}}, "client 7: computation = '50'"),
        ({8: {"computation": float("nan"), "communication": 1.0}}, "client 8: computation"),
        ({9: {"computation": 1.0, "communication": float("inf")}}, "client 9: communication"),
        ({10: {"computation": 0.0, "communication": 1.0}}, "client 10: computation = 0.0"),
        ({11: {"computation": 1.0, "communication": -5}}, "client 11: communication = -5"),
        ({12: {"computation": True, "communication": 1.0}}, "client 12: computation = True"),
    ],
)
def test_bad_capacity_files_are_named(tmp_path: Path, data: object, match: str) -> None:
    path = tmp_path / "capacity"
    path.write_bytes(data if isinstance(data, bytes) else pickle.dumps(data))
    with pytest.raises(ProfileError, match=match) as info:
        dt.load_fedscale_capacity(path)
    assert str(path) in str(info.value)


def test_values_outside_the_profile_ranges_are_refused_not_clipped(tmp_path: Path) -> None:
    # 1e-6 ms per inference -> 1e9 GFLOP/s, above the 1e6 a profile allows
    path = fedscale(
        tmp_path,
        {
            1: {"computation": 50.0, "communication": 1e3},
            42: {"computation": 1e-6, "communication": 1e3},
        },
    )
    with pytest.raises(ProfileError, match=r"client 42 \(computation 1e-06 ms.*gflops = 1"):
        dt.build(
            dt._parser().parse_args(
                ["--fedscale", str(path), "--reference-gflop", "3", "--out", "x.csv"]
            ),
            dt.ClientProfile("options", 1.0, 1.0, 0.025, 1.0, 1.0, 0.0),
        )
    with pytest.raises(SystemExit):  # an option outside its range stops before any file
        cli("--fedscale", path, "--reference-gflop", 3, "--dropout", 1.5, "--out", "x.csv")
    with pytest.raises(SystemExit):
        cli("--fedscale", path, "--out", "x.csv")  # --reference-gflop is required


# ---- FLASH availability --------------------------------------------------------------------


def test_readiness_on_a_hand_built_timeline() -> None:
    def events(lines: list[str]) -> list[tuple[datetime, str]]:
        return dt._events("t", "u", {"messages": lines})

    assert dt.readiness(events(HALF)) == 0.5
    assert dt.readiness(events(HALF[::-1])) == 0.5  # replayed in time order
    assert dt.readiness(events("\n".join(HALF) + "\n")) == 0.5  # FLASH's one string
    # ready from minute 30 to the end (60) of the trace: an open interval counts to the end;
    # states are matched lower-cased (FLASH's "WiFi", "4G"), unknown ones change nothing
    tail = [
        line(0, "4G"),
        line(10, "battery_charged_on"),
        line(20, "screen_lock"),
        line(30, "WiFi"),
        line(45, "phone_on"),
        line(60, "battery_low"),
    ]
    assert dt.readiness(events(tail)) == 0.5
    # screen_off is not locked (FLASH's idle = locked); wifi lost at 15 of 60 minutes
    never = [
        line(0, "wifi"),
        line(0, "battery_charged_on"),
        line(0, "screen_off"),
        line(60, "screen_on"),
    ]
    assert dt.readiness(events(never)) == 0.0
    lost = [
        line(0, "battery_charged_on"),
        line(0, "screen_lock"),
        line(0, "wifi"),
        line(15, "unknown"),
        line(60, "wifi"),
    ]
    assert dt.readiness(events(lost)) == 0.25
    assert dt.readiness(events([line(0, "wifi")])) is None
    assert dt.readiness([]) is None


def test_flash_alone_and_with_fedscale(tmp_path: Path) -> None:
    records = {
        "10": {"guid": "g10", "model": "m", "messages": "\n".join(HALF)},
        "7": {"guid": "g7", "model": "m", "messages": HALF[:3]},  # never locked: 0
        "3": {"guid": "g3", "model": "m", "messages": [line(0, "wifi")]},  # one instant
    }
    states = flash(tmp_path, records)
    assert dt.load_flash_availability(states) == ({"10": 0.5, "7": 0.0}, ["3"])
    out = tmp_path / "flash.csv"
    assert (
        cli(
            "--flash", states, "--gflops", 8, "--uplink-mbps", 2, "--downlink-mbps", 4, "--out", out
        )
        == 0
    )
    assert [
        (p.name, p.availability, p.gflops, p.uplink_mbps, p.downlink_mbps) for p in read_trace(out)
    ] == [("flash-7", 0.0, 8.0, 2.0, 4.0), ("flash-10", 0.5, 8.0, 2.0, 4.0)]
    capacity = fedscale(
        tmp_path, {i: {"computation": 50.0, "communication": 1e3} for i in (1, 2, 3)}
    )
    assert cli("--fedscale", capacity, "--reference-gflop", 3, "--flash", states, "--out", out) == 0
    assert [(p.name, p.availability) for p in read_trace(out)] == [
        ("fedscale-1+flash-7", 0.0),
        ("fedscale-2+flash-10", 0.5),
        ("fedscale-3+flash-7", 0.0),
    ]
    with pytest.raises(SystemExit):  # links and speed must come from somewhere
        cli("--flash", states, "--gflops", 8, "--out", out)
    with pytest.raises(SystemExit):
        cli(
            "--flash",
            states,
            "--gflops",
            8,
            "--uplink-mbps",
            2,
            "--downlink-mbps",
            4,
            "--availability",
            0.5,
            "--out",
            out,
        )


@pytest.mark.parametrize(
    ("records", "text", "match"),
    [
        ({}, '{"1": {"messages": []', "is not JSON"),
        ({}, "[1, 2]", "non-empty JSON object keyed by uid"),
        ({"5": {"guid": "g", "model": "m"}}, None, "uid 5: the record has no 'messages'"),
        ({"6": "x"}, None, "uid 6: the record is not a JSON object"),
        ({"7": {"messages": 3}}, None, "uid 7: 'messages' is neither"),
        ({"8": {"messages": [HALF[0], "2020-01-31 08:01:00 wifi"]}}, None, "uid 8, message 2"),
        ({"9": {"messages": ["31/01/2020 08:00:00\twifi"]}}, None, "uid 9, message 1"),
        ({"10": {"messages": ["2020-13-31 08:00:00\twifi"]}}, None, "uid 10, message 1"),
        ({"11": {"messages": ["2020-01-31 08:00:00\t"]}}, None, "uid 11, message 1"),
        ({"12": {"messages": [HALF[0], 5]}}, None, "uid 12, message 2"),
        ({"13": {"messages": [HALF[0]]}}, None, "no device has a trace spanning"),
    ],
)
def test_bad_flash_files_are_named(
    tmp_path: Path, records: dict[str, object], text: str | None, match: str
) -> None:
    path = flash(tmp_path, records, text)
    with pytest.raises(ProfileError, match=match) as info:
        dt.load_flash_availability(path)
    assert str(path) in str(info.value)


# ---- the command line, end to end ----------------------------------------------------------


def run(*args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "adc_flwr.population.device_traces", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_command_line_end_to_end(tmp_path: Path) -> None:
    capacity = fedscale(
        tmp_path, {i: {"computation": 20.0 * i, "communication": 1e3 * i} for i in range(1, 6)}
    )
    out = tmp_path / "out.csv"
    done = run("--fedscale", capacity, "--reference-gflop", 0.6, "--clients", 3, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 3 profiles to {out}: median ")
    assert len(done.stdout.splitlines()) == 1 and len(read_trace(out)) == 3
    bad = tmp_path / "capacity.csv"
    bad.write_text("client,computation,communication\n1,50,6100\n", encoding="utf-8")
    done = run("--fedscale", bad, "--reference-gflop", 0.6, "--out", tmp_path / "no.csv")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and str(bad) in done.stderr
    assert "is not a pickle" in done.stderr and not (tmp_path / "no.csv").exists()


def test_energy_figures_come_from_the_options(tmp_path: Path) -> None:
    path = fedscale(tmp_path, {1: {"computation": 50.0, "communication": 6100.0}})
    out = tmp_path / "profiles.csv"
    common = ("--fedscale", path, "--reference-gflop", 3.0, "--out", out)
    assert cli(*common, "--radio", "wifi", "--j-per-gflop", 0.5) == 0
    (profile,) = read_trace(out)
    assert (profile.radio, profile.j_per_gflop) == ("wifi", 0.5)
    assert cli(*common) == 0 and read_trace(out)[0].radio == "reference"
    with pytest.raises(SystemExit):  # argparse: an unknown radio is refused before any read
        cli(*common, "--radio", "5g-nr")
