"""The client population: per-client links, devices and reliability for a simulated clock.

Nothing here sleeps: a profile only turns bytes and FLOPs into seconds, and the seeded draws
say who is reachable and who drops out. Each draw comes from numpy's generator seeded by (run
seed, use, round or partition), so partition ``p`` gets the same device whatever the number
of partitions and no draw depends on the order of calls.
Mixes: ``uniform`` (a reference point of round numbers, not a measurement), ``edge`` (fibre, 5G,
LTE and IoT classes from public medians) and ``lognormal`` (FLASH/FedScale-like spreads).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np

# the physical range each numeric column must lie in, as (low, high, text of the rule):
# links up to 100 Gbit/s, a one-way latency under a minute, devices from a microcontroller
# (1 MFLOP/s) to a large GPU (1 PFLOP/s); a value outside is a typo in a trace, not a client
_RULES: dict[str, tuple[float, float, str]] = {
    "uplink_mbps": (0.0, 1e5, "in (0, 100000] Mbit/s (up to 100 Gbit/s)"),
    "downlink_mbps": (0.0, 1e5, "in (0, 100000] Mbit/s (up to 100 Gbit/s)"),
    "latency_s": (0.0, 60.0, "in [0, 60) s"),
    "gflops": (1e-3, 1e6, "in [0.001, 1000000] GFLOP/s"),
    "availability": (0.0, 1.0, "in [0, 1]"),
    "dropout": (0.0, 1.0, "in [0, 1]"),
}
MIXES: tuple[str, ...] = ("uniform", "edge", "lognormal")
TRACE_COLUMNS: tuple[str, ...] = ("name", *_RULES)


class ProfileError(ValueError):
    """A profile, trace or mix is invalid; the message says which file, line and column."""


def _obeys(column: str, value: float) -> bool:
    low, high, _ = _RULES[column]
    if column.endswith("_mbps"):
        return low < value <= high
    if column == "latency_s":
        return low <= value < high
    return low <= value <= high


@dataclass(frozen=True)
class ClientProfile:
    """One client's link, device and reliability; turns bytes and FLOPs into simulated seconds."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    latency_s: float
    gflops: float
    availability: float
    dropout: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProfileError(f"client profile name {self.name!r} must be a non-empty string")
        for column in _RULES:
            value = float(getattr(self, column))
            if not (math.isfinite(value) and _obeys(column, value)):
                rule = f"must be finite and {_RULES[column][2]}"
                raise ProfileError(f"client profile {self.name!r}: {column} = {value!r} {rule}")
            object.__setattr__(self, column, value)  # ints become floats: one type per column

    def upload_s(self, nbytes: int) -> float:
        """Seconds to send ``nbytes`` to the server: latency plus serialisation at the uplink."""
        return self.latency_s + nbytes * 8 / (self.uplink_mbps * 1e6)

    def download_s(self, nbytes: int) -> float:
        """Seconds to receive ``nbytes`` from the server."""
        return self.latency_s + nbytes * 8 / (self.downlink_mbps * 1e6)

    def compute_s(self, flops: float) -> float:
        """Seconds of device time for ``flops`` floating-point operations."""
        return flops / (self.gflops * 1e9)


# A reference point, not a measurement: round numbers, nobody unreachable, nobody drops, so a
# run with this mix behaves exactly like one without profiles.
UNIFORM = ClientProfile("uniform", 100.0, 100.0, 0.010, 100.0, 1.0, 0.0)

# Sources (only figures actually read). Speed tests report round-trip latency; ``latency_s`` is
# one-way (paid per message), hence "RTT/2".
# [OOKLA23] Ookla, "The State of Worldwide Connectivity in 2023", global medians, Q3 2023
# [OOKLA-FIXED] Ookla: lowest fixed-ISP latency 9 ms (Verizon, US), 12 ms (Movistar, AR, Q1 2023)
# [OS19] Opensignal, "State of Mobile: USA", May 2019 (Q1 2019 data), 4G users
# [OS16] Opensignal, "State of LTE", Nov 2016, global average
# [DAS22] Das et al., "Enabling On-Device Smartphone GPU based Training", arXiv 2202.10100:
#         DNN training on Snapdragon 8-series CPUs reaches 15-30 GFLOP/s
# [PI4] B. Feiereisen, "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64", Mar 2022 (HPL)
# [FLASH] PKU-Chengxu/FLASH models/speed_distri.json: per-user mean speeds of 19 users
# [FEDSCALE] FedScale device traces, second-hand: compute 15-199 ms/sample, median link 6.1 Mbit/s
# Availability and dropout are assumed everywhere (no per-class public figure was found); the
# dropouts stay within the 5-30 % per round quoted for cross-device FL (e.g. TU Berlin CommIT
# course notes, "Handling User Dropouts").

# fibre, home fixed broadband + laptop: up 38.32 / down 83.95 [OOKLA23 fixed medians]; 10 ms RTT/2
# assumed, between the [OOKLA-FIXED] figures; 50 GFLOP/s assumed, about half the 86-90 GFLOP/s
# peak of a 2-4 core AVX2 laptop CPU; mains-powered and wired, so 0.95 available, 0.01 dropout.
FIBRE = ClientProfile("fibre", 38.32, 83.95, 0.010 / 2, 50.0, 0.95, 0.01)
# 5g, flagship phone: up 18.93 / down 203.04 / 44 ms RTT/2 [OOKLA23 5G medians, multi-server
# latency]; 30 GFLOP/s [DAS22, top of the range]; idle and charging much of the day: 0.85, 0.05.
FIVE_G = ClientProfile("5g", 18.93, 203.04, 0.044 / 2, 30.0, 0.85, 0.05)
# lte, mid-range phone: up 6.3 [OS19 average 4G upload] / down 17.4 [OS16]; 55 ms RTT/2 [OS19:
# 44.1-66.4 ms, midpoint]; 15 GFLOP/s [DAS22, bottom of the range, assumed for a mid-range SoC].
LTE = ClientProfile("lte", 6.3, 17.4, 0.055 / 2, 15.0, 0.75, 0.10)
# iot, Raspberry-Pi-class board: up 0.431 / down 2.370 [FLASH: lowest per-user mean uplink and
# downlink]; 100 ms RTT/2 assumed (congested cellular: Ookla's best operator median in Cameroon
# was 184 ms, Q1 2023); 8 GFLOP/s [PI4: HPL on a Raspberry Pi 4]; battery-powered: 0.6, 0.15.
IOT = ClientProfile("iot", 0.431, 2.370, 0.100 / 2, 8.0, 0.60, 0.15)
# Assumed shares (sum 1), set so the median uplink is LTE's 6.3 Mbit/s and 20 % of clients are
# under 3 Mbit/s, near [FEDSCALE]'s median 6.1 Mbit/s and 26 % under 3 Mbit/s.
EDGE_CLASSES: tuple[ClientProfile, ...] = (FIBRE, FIVE_G, LTE, IOT)
EDGE_SHARES: tuple[float, ...] = (0.20, 0.25, 0.35, 0.20)

# lognormal's median client: up 3.286 / down 4.318 [FLASH: median of the users' mean speeds];
# 21.2 GFLOP/s, the geometric mean of [DAS22]'s 15-30; fixed latency 25 ms, assumed (about half the
# 44-55 ms mobile round trips above); fixed availability 0.8 and dropout 0.05, assumed.
LOGNORMAL = ClientProfile("lognormal", 3.286, 4.318, 0.025, math.sqrt(15.0 * 30.0), 0.80, 0.05)
# Spread = 95th / 5th percentile = e^(2 * 1.645 * sigma). Links: [FLASH]'s 15x range (one draw
# scales up and down together: a slow link is slow both ways). Devices: [FEDSCALE] 15-199 ms/sample.
_Z95 = NormalDist().inv_cdf(0.95)
SIGMA_LINK = math.log(15.0) / (2 * _Z95)  # 0.823
SIGMA_DEVICE = math.log(199 / 15) / (2 * _Z95)  # 0.786

# stream tags: keep the draws of each use independent under one run seed
_TAG_EDGE, _TAG_LOGNORMAL, _TAG_REACH, _TAG_DROP = 0xED6E, 0x1061, 0xAB1E, 0xD40B


def _rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """numpy's generator for one (seed, use, keys) stream: a draw never depends on call order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, tag, *keys])


def assign_profiles(
    mix: str, num_partitions: int, seed: int, trace: str | Path | None = None
) -> list[ClientProfile]:
    """One profile per partition, from a trace (rows wrap) or a named mix (seeded per partition,
    so partition ``p`` has the same device whatever the number of partitions)."""
    if num_partitions < 0:
        raise ProfileError(f"num_partitions must be >= 0, got {num_partitions}")
    if trace is not None and str(trace) != "":
        rows = read_trace(trace)
        return [rows[p % len(rows)] for p in range(num_partitions)]
    if mix not in MIXES:
        raise ProfileError(f"profile-mix {mix!r} is unknown; allowed values are {MIXES}")
    if mix == "uniform":
        return [UNIFORM] * num_partitions
    if mix == "edge":
        bounds = np.cumsum(EDGE_SHARES)[:-1]
        return [
            EDGE_CLASSES[int(np.searchsorted(bounds, _rng(seed, _TAG_EDGE, p).random(), "right"))]
            for p in range(num_partitions)
        ]
    up, down, gflops = LOGNORMAL.uplink_mbps, LOGNORMAL.downlink_mbps, LOGNORMAL.gflops
    profiles = []
    for p in range(num_partitions):
        link, device = _rng(seed, _TAG_LOGNORMAL, p).standard_normal(2)
        s, g = math.exp(SIGMA_LINK * link), math.exp(SIGMA_DEVICE * device)
        profiles.append(
            replace(LOGNORMAL, uplink_mbps=up * s, downlink_mbps=down * s, gflops=gflops * g)
        )
    return profiles


def _cell(column: str, text: str, where: str) -> str | float:
    if column == "name":
        if not text.strip():
            raise ProfileError(f"{where}: the name is empty")
        return text.strip()
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ProfileError(f"{where}: {text.strip()!r} is not finite")
    if not _obeys(column, value):
        raise ProfileError(f"{where}: {value!r} is out of range (must be {_RULES[column][2]})")
    return value


def read_trace(path: str | Path) -> list[ClientProfile]:
    """Profiles from a CSV with a TRACE_COLUMNS header (a ``partition`` column is ignored)."""
    where = f"profile-trace {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # tolerate a spreadsheet's BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: cannot be read ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    header = [c.strip() for c in next(reader, [])]
    if not any(header):
        raise ProfileError(f"{where} line 1: empty; a header {','.join(TRACE_COLUMNS)} is required")
    for column in header:
        if column not in (*TRACE_COLUMNS, "partition") or header.count(column) > 1:
            wanted = f"each of {TRACE_COLUMNS} once (and optionally 'partition')"
            raise ProfileError(f"{where} line 1, column {column!r}: unknown or repeated; {wanted}")
    for column in TRACE_COLUMNS:
        if column not in header:
            raise ProfileError(f"{where} line 1, column {column!r}: missing from the header")
    profiles: list[ClientProfile] = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank lines (e.g. a trailing one) carry no client
        if len(cells) != len(header):
            column = header[len(cells)] if len(cells) < len(header) else f"#{len(header) + 1}"
            raise ProfileError(
                f"{where} line {line}, column {column!r}: "
                f"{len(cells)} cells where the header has {len(header)}"
            )
        values = {
            column: _cell(column, cell, f"{where} line {line}, column {column!r}")
            for column, cell in zip(header, cells, strict=True)
            if column != "partition"
        }
        profiles.append(ClientProfile(**values))  # type: ignore[arg-type]
    if not profiles:
        raise ProfileError(f"{where} line 2: no client rows after the header")
    return profiles


def write_profiles(path: str | Path, profiles: Sequence[ClientProfile]) -> None:
    """Write ``partition`` + TRACE_COLUMNS atomically; floats as repr, so read_trace is exact."""
    from adc_flwr.run.files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("partition", *TRACE_COLUMNS))
    for p, profile in enumerate(profiles):
        numbers = (repr(float(getattr(profile, c))) for c in TRACE_COLUMNS[1:])
        writer.writerow((p, profile.name, *numbers))
    atomic_write_text(Path(path), buffer.getvalue())


class Population:
    """The run's clients: their profiles and the seeded draws of who is reachable and who drops out.

    Every draw comes from its own generator seeded by (seed, round[, partition]), so it does
    not depend on call order.
    """

    def __init__(self, profiles: Sequence[ClientProfile], seed: int) -> None:
        if not profiles:
            raise ProfileError("a population needs at least one client profile")
        self.profiles: tuple[ClientProfile, ...] = tuple(profiles)
        self.seed = int(seed)
        self._availability = np.array([p.availability for p in self.profiles])

    def __len__(self) -> int:
        return len(self.profiles)

    def __getitem__(self, partition: int) -> ClientProfile:
        if not 0 <= partition < len(self.profiles):
            raise IndexError(f"partition {partition} is outside 0..{len(self.profiles) - 1}")
        return self.profiles[partition]

    def reachable(self, server_round: int) -> np.ndarray:
        """Who can be sampled at this round's start: u < availability, one u per client."""
        u = _rng(self.seed, _TAG_REACH, server_round).random(len(self.profiles))
        return u < self._availability

    def dropout_exchange(self, server_round: int, partition: int, exchanges: int) -> int | None:
        """None: stays all round; else the exchange (0 = first) whose reply never comes."""
        if exchanges < 1:
            raise ValueError(f"exchanges must be >= 1, got {exchanges}")
        dropout = self[partition].dropout
        u = _rng(self.seed, _TAG_DROP, server_round, partition).random(2)
        if u[0] >= dropout:
            return None
        return min(int(u[1] * exchanges), exchanges - 1)

    @property
    def median_uplink_mbps(self) -> float:
        """The population's median uplink, a reference for per-client compression choices."""
        return float(np.median([p.uplink_mbps for p in self.profiles]))
