"""The client population: per-client links, devices, reliability and energy figures.

Nothing here sleeps: a profile only turns bytes and FLOPs into seconds (a recorded link, see
links.py, at the moment each transfer starts), and the seeded draws
say who is reachable and who drops out. Each draw comes from numpy's generator seeded by (run
seed, use, round or partition), so partition ``p`` gets the same device whatever the number
of partitions and no draw depends on the order of calls.
Mixes: ``uniform`` (a reference point of round numbers, not a measurement), ``edge`` (fibre, 5G,
LTE and IoT classes from public medians) and ``lognormal`` (FLASH/FedScale-like spreads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from adc_flwr.population.energy import (
    RADIOS,
    REFERENCE_J_PER_GFLOP,
    REFERENCE_RADIO,
    RadioPower,
)
from adc_flwr.population.links import LinkTrace, offset_s

# the physical range each numeric column must lie in, as (low, high, text of the rule):
# links up to 100 Gbit/s, a one-way latency under a minute, devices from a microcontroller
# (1 MFLOP/s) to a large GPU (1 PFLOP/s); a value outside is a typo in a trace, not a client
RULES: dict[str, tuple[float, float, str]] = {
    "uplink_mbps": (0.0, 1e5, "in (0, 100000] Mbit/s (up to 100 Gbit/s)"),
    "downlink_mbps": (0.0, 1e5, "in (0, 100000] Mbit/s (up to 100 Gbit/s)"),
    "latency_s": (0.0, 60.0, "in [0, 60) s"),
    "gflops": (1e-3, 1e6, "in [0.001, 1000000] GFLOP/s"),
    "availability": (0.0, 1.0, "in [0, 1]"),
    "dropout": (0.0, 1.0, "in [0, 1]"),
}
MIXES: tuple[str, ...] = ("uniform", "edge", "lognormal")
J_PER_GFLOP_RANGE = (1e-4, 1e3)  # 10 TFLOP/J (beyond any chip) to 1 GFLOP/kJ


class ProfileError(ValueError):
    """A profile, trace or mix is invalid; the message says which file, line and column."""


def obeys(column: str, value: float) -> bool:
    low, high, _ = RULES[column]
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
    radio: str = REFERENCE_RADIO.name  # its radio's power model (energy.RADIOS)
    j_per_gflop: float = REFERENCE_J_PER_GFLOP  # its device's compute energy
    # recorded links (None: the constant rate); a link's *_mbps is then the trace's mean
    uplink_trace: LinkTrace | None = None
    downlink_trace: LinkTrace | None = None
    trace_offset_s: float = 0.0  # where in its traces the client's time 0 falls (seeded)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProfileError(f"client profile name {self.name!r} must be a non-empty string")
        for column in RULES:
            value = float(getattr(self, column))
            if not (math.isfinite(value) and obeys(column, value)):
                rule = f"must be finite and {RULES[column][2]}"
                raise ProfileError(f"client profile {self.name!r}: {column} = {value!r} {rule}")
            object.__setattr__(self, column, value)  # ints become floats: one type per column
        if self.radio not in RADIOS:
            raise ProfileError(
                f"client profile {self.name!r}: radio {self.radio!r} is not one of {tuple(RADIOS)}"
            )
        low, high = J_PER_GFLOP_RANGE
        if not (math.isfinite(self.j_per_gflop) and low <= self.j_per_gflop <= high):
            raise ProfileError(
                f"client profile {self.name!r}: j_per_gflop = {self.j_per_gflop!r} "
                f"must be in [{low:g}, {high:g}] J per GFLOP"
            )
        for link in ("uplink", "downlink"):
            trace = getattr(self, f"{link}_trace")
            if trace is not None and getattr(self, f"{link}_mbps") != trace.mean_mbps:
                raise ProfileError(
                    f"client profile {self.name!r}: {link}_mbps must be its trace's mean "
                    f"({trace.mean_mbps!r} Mbit/s for {trace.path})"
                )
        if not (math.isfinite(self.trace_offset_s) and self.trace_offset_s >= 0):
            raise ProfileError(f"client profile {self.name!r}: trace_offset_s must be >= 0")

    def upload_s(self, nbytes: int, start_s: float = 0.0) -> float:
        """Seconds to send ``nbytes`` to the server from ``start_s`` (simulated seconds):
        serialisation at the uplink, then latency."""
        if self.uplink_trace is None:
            return self.latency_s + nbytes * 8 / (self.uplink_mbps * 1e6)
        return self.latency_s + self.uplink_trace.transfer_s(start_s + self.trace_offset_s, nbytes)

    def download_s(self, nbytes: int, start_s: float = 0.0) -> float:
        """Seconds to receive ``nbytes`` the server sends at ``start_s``: latency, then
        serialisation at the downlink."""
        if self.downlink_trace is None:
            return self.latency_s + nbytes * 8 / (self.downlink_mbps * 1e6)
        at = start_s + self.latency_s + self.trace_offset_s
        return self.latency_s + self.downlink_trace.transfer_s(at, nbytes)

    @property
    def radio_power(self) -> RadioPower:
        return RADIOS[self.radio]

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
# [GEERLING] J. Geerling, geerlingguy/top500-benchmark README: HPL (FP64, all cores) with the
#         whole system's average wall power: Raspberry Pi 4 11.889 GFLOP/s at 7.2 W; Lenovo
#         M710q Tiny (i5-7400T, a 35 W laptop-class CPU) 72.472 at 41 W; M4 Mac mini 299.93 at
#         39.6 W. J/GFLOP = W / (GFLOP/s); FP32 training on the same chips is not measured there.
# Energy (adc_flwr/population/energy.py has the radios): a class's radio is its link's; 5g and
# iot use LTE's model (assumed: no public 5G NR or IoT-modem model was at hand; 5G NR is
# reported less efficient than LTE at low rates and more at peak rates, SRG 2019).
# Availability and dropout are assumed everywhere (no per-class public figure was found); the
# dropouts stay within the 5-30 % per round quoted for cross-device FL (e.g. TU Berlin CommIT
# course notes, "Handling User Dropouts").

# fibre, home fixed broadband + laptop: up 38.32 / down 83.95 [OOKLA23 fixed medians]; 10 ms RTT/2
# assumed, between the [OOKLA-FIXED] figures; 50 GFLOP/s assumed, about half the 86-90 GFLOP/s
# peak of a 2-4 core AVX2 laptop CPU; mains-powered and wired, so 0.95 available, 0.01 dropout;
# WiFi to the router; 41 / 72.472 J/GFLOP [GEERLING, i5-7400T].
FIBRE = ClientProfile("fibre", 38.32, 83.95, 0.010 / 2, 50.0, 0.95, 0.01, "wifi", 41 / 72.472)
# 5g, flagship phone: up 18.93 / down 203.04 / 44 ms RTT/2 [OOKLA23 5G medians, multi-server
# latency]; 30 GFLOP/s [DAS22, top of the range]; idle and charging much of the day: 0.85, 0.05;
# 39.6 / 299.93 J/GFLOP: a 2024 Arm SoC [GEERLING, M4], assumed for a flagship phone's SoC.
FIVE_G = ClientProfile("5g", 18.93, 203.04, 0.044 / 2, 30.0, 0.85, 0.05, "lte", 39.6 / 299.93)
# lte, mid-range phone: up 6.3 [OS19 average 4G upload] / down 17.4 [OS16]; 55 ms RTT/2 [OS19:
# 44.1-66.4 ms, midpoint]; 15 GFLOP/s [DAS22, bottom of the range, assumed for a mid-range SoC];
# 0.3 J/GFLOP assumed, between the M4's 0.13 and the Pi 4's 0.61 [GEERLING].
LTE = ClientProfile("lte", 6.3, 17.4, 0.055 / 2, 15.0, 0.75, 0.10, "lte", 0.3)
# iot, Raspberry-Pi-class board: up 0.431 / down 2.370 [FLASH: lowest per-user mean uplink and
# downlink]; 100 ms RTT/2 assumed (congested cellular: Ookla's best operator median in Cameroon
# was 184 ms, Q1 2023); 8 GFLOP/s [PI4: HPL on a Raspberry Pi 4]; battery-powered: 0.6, 0.15;
# 7.2 / 11.889 J/GFLOP [GEERLING, Raspberry Pi 4].
IOT = ClientProfile("iot", 0.431, 2.370, 0.100 / 2, 8.0, 0.60, 0.15, "lte", 7.2 / 11.889)
# Assumed shares (sum 1), set so the median uplink is LTE's 6.3 Mbit/s and 20 % of clients are
# under 3 Mbit/s, near [FEDSCALE]'s median 6.1 Mbit/s and 26 % under 3 Mbit/s.
EDGE_CLASSES: tuple[ClientProfile, ...] = (FIBRE, FIVE_G, LTE, IOT)
EDGE_SHARES: tuple[float, ...] = (0.20, 0.25, 0.35, 0.20)

# lognormal's median client: up 3.286 / down 4.318 [FLASH: median of the users' mean speeds];
# 21.2 GFLOP/s, the geometric mean of [DAS22]'s 15-30; fixed latency 25 ms, assumed (about half the
# 44-55 ms mobile round trips above); fixed availability 0.8 and dropout 0.05, assumed; LTE's
# radio and 0.3 J/GFLOP as the lte class.
LOGNORMAL = ClientProfile(
    "lognormal", 3.286, 4.318, 0.025, math.sqrt(15.0 * 30.0), 0.80, 0.05, "lte", 0.3
)
# Spread = 95th / 5th percentile = e^(2 * 1.645 * sigma). Links: [FLASH]'s 15x range (one draw
# scales up and down together: a slow link is slow both ways). Devices: [FEDSCALE] 15-199 ms/sample.
_Z95 = NormalDist().inv_cdf(0.95)
SIGMA_LINK = math.log(15.0) / (2 * _Z95)  # 0.823
SIGMA_DEVICE = math.log(199 / 15) / (2 * _Z95)  # 0.786

# stream tags: keep the draws of each use independent under one run seed
_TAG_EDGE, _TAG_LOGNORMAL, _TAG_REACH, _TAG_DROP = 0xED6E, 0x1061, 0xAB1E, 0xD40B
_TAG_LINK = 0x714C


def _rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """numpy's generator for one (seed, use, keys) stream: a draw never depends on call order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, tag, *keys])


def _start_links(row: ClientProfile, seed: int, partition: int) -> ClientProfile:
    """``row`` for ``partition``: with recorded links, its own seeded start into them (one
    offset for both directions: up and down traces are recorded together)."""
    traces = [t for t in (row.uplink_trace, row.downlink_trace) if t is not None]
    if not traces:
        return row
    u = _rng(seed, _TAG_LINK, partition).random()
    return replace(row, trace_offset_s=offset_s(max(t.period_ms for t in traces), u))


def assign_profiles(
    mix: str, num_partitions: int, seed: int, rows: Sequence[ClientProfile] | None = None
) -> list[ClientProfile]:
    """One profile per partition, from a trace's ``rows`` (they wrap) or a named mix (seeded
    per partition, so partition ``p`` has the same device whatever the number of partitions).
    A row with recorded links starts each of its partitions at a seeded offset into them."""
    if num_partitions < 0:
        raise ProfileError(f"num_partitions must be >= 0, got {num_partitions}")
    if rows:
        return [_start_links(rows[p % len(rows)], seed, p) for p in range(num_partitions)]
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
