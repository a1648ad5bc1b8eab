"""The `edge_traces` study's populations: the `edge` mix's classes with static links, and the
same with synthetic recorded-style links of the same means (adc_flwr.population.link_series).

Twenty clients in the mix's shares (4 fibre, 5 5g, 7 lte, 4 iot), all reachable and none
dropping out, so that the two populations differ only in their links. In `edge_traced.csv`
the lte and iot classes' uplinks and downlinks are 120 s synthetic traces (one per class and
direction, seeded; each client starts at its own seeded offset into them); fibre and 5g keep
constant links (their traces would be megabytes). `edge_static.csv` gives every link the
rate its traced twin averages, exactly (the trace's mean as read back).

    python -m simulations.edge_traces   # rewrites simulations/experiments/traces/edge_*
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from adc_flwr.population.link_series import synthetic_series, to_mahimahi, write_mahimahi
from adc_flwr.population.links import read_link_trace
from adc_flwr.population.profile_csv import write_profiles
from adc_flwr.population.profiles import FIBRE, FIVE_G, IOT, LTE, ClientProfile

TRACES = Path(__file__).resolve().parent / "experiments" / "traces"
COUNTS = ((FIBRE, 4), (FIVE_G, 5), (LTE, 7), (IOT, 4))  # the edge mix's shares of 20
TRACED = (LTE, IOT)
SECONDS = 120


def traced_class(profile: ClientProfile, seed: int, folder: Path) -> ClientProfile:
    """``profile`` with synthetic up and down traces of its rates' means."""
    links = {}
    for offset, link in enumerate(("uplink", "downlink")):
        path = folder / f"{profile.name}.{link[:-4]}.gz"  # lte.up.gz, lte.down.gz
        rates = synthetic_series(getattr(profile, f"{link}_mbps"), SECONDS, seed + offset)
        write_mahimahi(path, to_mahimahi(rates))
        trace = read_link_trace(path)
        links |= {f"{link}_trace": trace, f"{link}_mbps": trace.mean_mbps}
    return dataclasses.replace(profile, **links)


def write_populations(folder: Path = TRACES) -> None:
    """Write both CSVs and the traces into ``folder``."""
    classes = {p.name: p for p, _ in COUNTS}
    for seed, profile in enumerate(TRACED):
        classes[profile.name] = traced_class(profile, 100 * (seed + 1), folder)
    traced = [
        dataclasses.replace(classes[p.name], availability=1.0, dropout=0.0)
        for p, n in COUNTS
        for _ in range(n)
    ]
    static = [dataclasses.replace(p, uplink_trace=None, downlink_trace=None) for p in traced]
    write_profiles(folder / "edge_traced.csv", traced, relative=True)
    write_profiles(folder / "edge_static.csv", static, relative=True)


def main() -> int:
    write_populations()
    print(f"wrote {TRACES}/edge_traced.csv, edge_static.csv and the lte/iot traces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
