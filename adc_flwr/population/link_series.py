"""Throughput series into mahimahi traces, and synthetic series that swing as cellular links do.

Many public link recordings are throughput per interval ("time_s<TAB>Mbit/s": Pensieve's
cooked traces, the 5G dataset's 1 Hz bitrates), not delivery opportunities. ``to_mahimahi``
spreads each interval's packets evenly over its milliseconds (a fractional packet carries into
the next interval, so the trace's mean is the series' mean to within one packet), ending the
last interval on its last millisecond so that the trace repeats with the series' length.

``synthetic_series``: per-second rates whose logarithm is a stationary AR(1) process, scaled
to a given mean; ``spread`` is the 90th over the 50th percentile of the rates. The default
2.42 is the Saturator ATT-LTE-driving-2016 uplink's p90 / p50 (3.8 / 1.57 Mbit/s, per-second
throughput computed from ravinet/mahimahi's traces/); its p10 (0.26) is lower than a
lognormal gives (about 0.65 at that median): recorded links have outages this model lacks.
The one-second autocorrelation 0.8 is assumed. These series are synthetic, not recordings.

    python -m adc_flwr.population.link_series synth --mean-mbps 6.3 --seconds 300 --seed 1 \\
        --out lte.up.gz
    python -m adc_flwr.population.link_series convert cooked.tsv --out cooked.down
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np

from adc_flwr.population.links import PACKET_BYTES, LinkTrace, TraceError, check_physical
from adc_flwr.run.files import RunDirError, atomic_write_bytes

ATT_LTE_UPLINK_SPREAD = 3.8 / 1.57  # p90 / p50 of per-second uplink throughput
ASSUMED_AUTOCORRELATION = 0.8  # of log-throughput one second apart


def synthetic_series(
    mean_mbps: float,
    seconds: int,
    seed: int,
    spread: float = ATT_LTE_UPLINK_SPREAD,
    autocorrelation: float = ASSUMED_AUTOCORRELATION,
) -> np.ndarray:
    """``seconds`` per-second rates (Mbit/s) with mean ``mean_mbps`` (exactly, as sampled)."""
    if not (mean_mbps > 0 and seconds >= 1 and spread >= 1 and 0 <= autocorrelation < 1):
        raise ValueError(
            f"need mean_mbps > 0, seconds >= 1, spread >= 1, autocorrelation in [0, 1); got "
            f"{mean_mbps}, {seconds}, {spread}, {autocorrelation}"
        )
    sigma = math.log(spread) / NormalDist().inv_cdf(0.9)
    rng = np.random.default_rng(seed)
    shocks = rng.standard_normal(seconds)
    log_rate = np.empty(seconds)
    log_rate[0] = shocks[0]
    keep = math.sqrt(1 - autocorrelation**2)
    for t in range(1, seconds):
        log_rate[t] = autocorrelation * log_rate[t - 1] + keep * shocks[t]
    rates = np.exp(sigma * log_rate)
    return rates * (mean_mbps / rates.mean())


def to_mahimahi(rates_mbps: Sequence[float], interval_ms: int = 1000) -> list[int]:
    """Delivery-opportunity milliseconds for one rate per ``interval_ms``."""
    per_packet_mbit = PACKET_BYTES * 8 / 1e6
    times: list[int] = []
    carry = 0.0
    for index, rate in enumerate(rates_mbps):
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"interval {index}: rate {rate!r} must be finite and >= 0")
        carry += rate * interval_ms / 1000 / per_packet_mbit
        packets = int(carry)
        carry -= packets
        start = index * interval_ms
        times.extend(start + math.ceil((j + 1) * interval_ms / packets) for j in range(packets))
    period = len(rates_mbps) * interval_ms
    if not times or times[-1] != period:
        times.append(period)  # the trace repeats with the series' length
    return times


def write_mahimahi(path: str | Path, times: Sequence[int]) -> None:
    """Write a trace (gzipped when the name ends in ``.gz``, reproducibly: no timestamp)."""
    text = "".join(f"{t}\n" for t in times).encode("ascii")
    if str(path).endswith(".gz"):
        text = gzip.compress(text, mtime=0)
    atomic_write_bytes(Path(path), text)


def read_series(path: str | Path) -> tuple[list[float], int]:
    """A "time_s<whitespace>Mbit/s" series with evenly spaced times: (rates, interval ms)."""
    times, rates = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cells = line.split()
        try:
            time_s, rate = float(cells[0]), float(cells[1])
        except (IndexError, ValueError):
            raise TraceError(f"series {path} line {number}: want 'time_s Mbit/s'") from None
        times.append(time_s)
        rates.append(rate)
    if len(times) < 2:
        raise TraceError(f"series {path}: needs at least two lines")
    if not np.all(np.isfinite(times)):
        raise TraceError(f"series {path}: every time must be finite")
    steps = np.diff(times)
    interval = float(np.median(steps))
    if interval <= 0 or np.any(np.abs(steps - interval) > 0.01 * interval):
        raise TraceError(f"series {path}: times must be evenly spaced (median step {interval} s)")
    interval_ms = round(interval * 1000)
    if interval_ms < 1 or abs(interval * 1000 - interval_ms) > 1e-6 * interval * 1000:
        raise TraceError(
            f"series {path}: the step ({interval * 1000:g} ms) must be a whole number of "
            "milliseconds, at least 1 (a trace's resolution)"
        )
    return rates, interval_ms


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="a synthetic per-second series, as a trace")
    synth.add_argument("--mean-mbps", type=float, required=True)
    synth.add_argument("--seconds", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--spread", type=float, default=ATT_LTE_UPLINK_SPREAD)
    synth.add_argument("--autocorrelation", type=float, default=ASSUMED_AUTOCORRELATION)
    synth.add_argument("--out", required=True)
    convert = commands.add_parser("convert", help="a 'time_s Mbit/s' series, as a trace")
    convert.add_argument("series")
    convert.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            rates = synthetic_series(
                args.mean_mbps, args.seconds, args.seed, args.spread, args.autocorrelation
            )
            times = to_mahimahi(rates)
        else:
            series, interval = read_series(args.series)
            times = to_mahimahi(series, interval)
        check_physical(times, f"the trace for {args.out}")  # what a run would refuse
        write_mahimahi(args.out, times)
    except (ValueError, OSError, RunDirError) as exc:
        print(f"link_series: {exc}", file=sys.stderr)
        return 2
    trace = LinkTrace(args.out, tuple(times))
    print(
        f"{args.out}: {len(times)} opportunities over {trace.period_ms / 1000:g} s, "
        f"{trace.mean_mbps:.4g} Mbit/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
