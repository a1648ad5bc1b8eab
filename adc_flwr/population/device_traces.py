"""Third-party device traces (FedScale capacity, FLASH availability) into a profile-trace CSV.

Run by hand, once: ``python -m adc_flwr.population.device_traces --fedscale FILE
--reference-gflop G --out profiles.csv``. A run then reads that CSV as data
(``profile-trace``); no run ever unpickles anything.

FedScale ``client_device_capacity`` (SymbioticLab/FedScale, Apache-2.0, its dataset README says
research purpose only) is a pickled dict {client id: {'computation': ms per sample of
inference, 'communication': kbit/s}}. Verified in FedScale's code (commit 7ec441c):
``benchmark/dataset/data/device_info/README.md`` gives the format; ``aggregator.py`` loads it
with ``pickle.load``, looks clients up by int id and counts update sizes in kbit; and
``client_metadata.py`` turns ms into s and multiplies by 3 for training (forward + backward),
dividing (pull + push) by the one bandwidth. Not verified: the file itself (not in the
mirror); we assume plain ints or floats (a numpy scalar names a global: refused, and named).
A pickle can run code when loaded: ``_PlainUnpickler`` refuses every global, so only plain
containers, strings and numbers come out and a planted file cannot run code.

FLASH ``data/state_traces.json`` (PKU-Chengxu/FLASH, BSD-2) maps uid -> {guid, model,
messages}. Verified in ``models/timer.py`` and ``models/client.py`` (commit 55cbede):
``messages`` is one string of "YYYY-mm-dd HH:MM:SS<TAB>state" lines (a list of such lines is
accepted too). States are lower-cased. A device is ready while locked (``screen_lock``, cleared
by ``screen_unlock``; FLASH tracks ``screen_off``/``screen_on`` but does not use them), charging
(``battery_charged_on``/``_off``) and on ``wifi`` (cleared by 2g/3g/4g/5g/unknown). Battery
levels and other states change nothing. Where we differ from FLASH:
- messages are sorted by time; FLASH replays them in file order;
- a ready interval still open at the last message counts up to it; FLASH drops it;
- a never-ready device gets availability 0; FLASH redraws it, and a zero-span trace too, which
  we skip.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
from collections.abc import Hashable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from adc_flwr.population.energy import RADIOS, REFERENCE_J_PER_GFLOP, REFERENCE_RADIO
from adc_flwr.population.links import QUOTE_CHARS, quote
from adc_flwr.population.profile_csv import write_profiles
from adc_flwr.population.profiles import ClientProfile, ProfileError
from adc_flwr.run.files import RunDirError
from adc_flwr.run.input_root import InputPathError, check_input

# FLASH state -> (flag, value); ready = locked and charging and wifi (models/timer.py)
_FLAGS: dict[str, tuple[str, bool]] = {
    "screen_lock": ("locked", True),
    "screen_unlock": ("locked", False),
    "battery_charged_on": ("charging", True),
    "battery_charged_off": ("charging", False),
    "wifi": ("wifi", True),
    **{s: ("wifi", False) for s in ("2g", "3g", "4g", "5g", "unknown")},
}
K = TypeVar("K", bound=Hashable)
_STAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def _cut(value: object, limit: int = QUOTE_CHARS) -> str:
    """A key or value of a trace file for an error: at most ``limit`` characters of it."""
    text = str(value)
    return text[:limit] + ("..." if len(text) > limit else "")


class _Refused(pickle.UnpicklingError):
    """The pickle names a global (a class or function): loading it could run code."""


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain containers and numbers: every global is refused."""

    def find_class(self, module: str, name: str) -> object:
        dotted = f"{module}.{name}"
        if not all(part.isidentifier() for part in dotted.split(".")):
            # text starting with "c" reads as the GLOBAL opcode: a foreign file, not a threat
            raise pickle.UnpicklingError(f"no global is named {quote(dotted)}")
        raise _Refused(_cut(dotted))


def load_fedscale_capacity(path: str | Path) -> dict[int, tuple[float, float]]:
    """{client id: (inference ms per sample, kbit/s)} from FedScale's pickled capacity dict."""
    where = f"FedScale capacity {path}"
    try:
        with open(check_input(path), "rb") as file:
            data = _PlainUnpickler(file).load()
    except _Refused as exc:
        raise ProfileError(
            f"{where}: names the global {exc}; refused, since loading a class or function "
            "could run code and a capacity trace holds only dicts and numbers"
        ) from None
    except InputPathError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{where}: cannot be read ({exc})") from exc
    except Exception as exc:  # a corrupt or foreign file fails in many ways
        raise ProfileError(f"{where}: is not a pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: holds a {type(data).__name__}, not a dict of clients")
    if not data:
        raise ProfileError(f"{where}: holds no clients")
    capacity: dict[int, tuple[float, float]] = {}
    for cid, entry in data.items():
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise ProfileError(f"{where}: client id {_cut(repr(cid))} is not an int")
        if not isinstance(entry, dict):
            raise ProfileError(f"{where}, client {cid}: {type(entry).__name__}, not a dict")
        numbers = []
        for key in ("computation", "communication"):
            if key not in entry:
                raise ProfileError(f"{where}, client {cid}: no {key!r}")
            value = entry[key]
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ProfileError(
                    f"{where}, client {cid}: {key} = {_cut(repr(value))} must be a finite "
                    "number > 0"
                )
            numbers.append(float(value))
        capacity[cid] = (numbers[0], numbers[1])
    return capacity


def fedscale_gflops(computation_ms: float, reference_gflop: float) -> float:
    """GFLOP/s of a device that trains one sample of a ``reference_gflop`` model (forward +
    backward) in 3 x its inference time, as FedScale counts training."""
    return reference_gflop / (3.0 * computation_ms / 1000.0)


def _events(where: str, uid: str, record: object) -> list[tuple[datetime, str]]:
    if not isinstance(record, dict):
        raise ProfileError(f"{where}, uid {_cut(uid)}: the record is not a JSON object")
    if "messages" not in record:
        raise ProfileError(f"{where}, uid {_cut(uid)}: the record has no 'messages'")
    messages = record["messages"]
    if isinstance(messages, str):
        messages = messages.split("\n")
    if not isinstance(messages, list):
        raise ProfileError(f"{where}, uid {_cut(uid)}: 'messages' is neither a string nor a list")
    events = []
    for i, line in enumerate(messages, start=1):
        if isinstance(line, str) and not line.strip():
            continue  # blank lines (a trailing newline) carry nothing, as in FLASH
        parts = line.strip().split("\t") if isinstance(line, str) else []
        if len(parts) != 2 or not _STAMP.fullmatch(parts[0].strip()) or not parts[1].strip():
            raise ProfileError(
                f"{where}, uid {_cut(uid)}, message {i}: {quote(line)} is not "
                "'YYYY-mm-dd HH:MM:SS<TAB>state'"
            )
        try:
            stamp = datetime.fromisoformat(parts[0].strip())
        except ValueError as exc:
            raise ProfileError(f"{where}, uid {_cut(uid)}, message {i}: {exc}") from None
        events.append((stamp, parts[1].strip().lower()))
    return events


def readiness(events: Sequence[tuple[datetime, str]]) -> float | None:
    """The fraction of the span from first to last event during which the device is ready
    (locked, charging, on WiFi); None when the span is empty. Not ready before any event."""
    if not events:
        return None
    ordered = sorted(events, key=lambda event: event[0])  # stable: ties keep file order
    span = (ordered[-1][0] - ordered[0][0]).total_seconds()
    if span <= 0:
        return None
    flags = {"locked": False, "charging": False, "wifi": False}
    since: datetime | None = None
    ready_s = 0.0
    for stamp, state in ordered:
        if state in _FLAGS:
            flag, value = _FLAGS[state]
            flags[flag] = value
        ready = all(flags.values())
        if ready and since is None:
            since = stamp
        elif not ready and since is not None:
            ready_s += (stamp - since).total_seconds()
            since = None
    if since is not None:
        ready_s += (ordered[-1][0] - since).total_seconds()
    return ready_s / span


def load_flash_availability(path: str | Path) -> tuple[dict[str, float], list[str]]:
    """({uid: availability}, uids skipped for a trace of zero span) from FLASH's state traces."""
    where = f"FLASH states {path}"
    try:
        data = json.loads(check_input(path).read_text(encoding="utf-8"))
    except InputPathError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{where}: cannot be read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{where}: is not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ProfileError(f"{where}: must be a non-empty JSON object keyed by uid")
    availability: dict[str, float] = {}
    skipped: list[str] = []
    for uid, record in data.items():
        share = readiness(_events(where, uid, record))
        if share is None:
            skipped.append(uid)
        else:
            availability[uid] = share
    if not availability:
        raise ProfileError(f"{where}: no device has a trace spanning more than one instant")
    return availability, skipped


def _order(key: Hashable) -> tuple[int, int, str]:
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def choose(ids: Sequence[K], n: int | None, seed: int) -> list[K]:
    """``n`` ids drawn without replacement from the sorted ids, seeded (all of them if None)."""
    ordered = sorted(ids, key=_order)
    if n is None:
        return ordered
    if not 1 <= n <= len(ordered):
        raise ProfileError(f"--clients {n}: the trace has {len(ordered)} clients")
    picks = np.random.default_rng(seed).choice(len(ordered), size=n, replace=False)
    return [ordered[int(i)] for i in picks]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adc_flwr.population.device_traces",
        description="Convert FedScale / FLASH device traces into a profile-trace CSV.",
    )
    add = parser.add_argument
    add("--fedscale", type=Path, help="FedScale client_device_capacity (a pickle)")
    help = "GFLOP of one training sample (fwd+bwd) of the trace's model; needs --fedscale"
    add("--reference-gflop", type=float, help=help)
    add("--flash", type=Path, help="FLASH state_traces.json: availability per device")
    add("--gflops", type=float, help="device speed for every client (FLASH alone)")
    add("--uplink-mbps", type=float, help="uplink for every client (FLASH alone)")
    add("--downlink-mbps", type=float, help="downlink for every client (FLASH alone)")
    add("--latency-s", type=float, default=0.025, help="one-way latency (assumed; 0.025)")
    add("--availability", type=float, default=None, help="without --flash (assumed; 1.0)")
    add("--dropout", type=float, default=0.0, help="drop-out probability (assumed; 0.0)")
    add("--radio", choices=tuple(RADIOS), default=REFERENCE_RADIO.name, help="energy model")
    add("--j-per-gflop", type=float, default=REFERENCE_J_PER_GFLOP, help="device energy")
    add("--clients", type=int, default=None, help="how many profiles (default: all)")
    add("--seed", type=int, default=0, help="seed of the draw of --clients (default 0)")
    add("--out", type=Path, required=True, help="the profile-trace CSV to write")
    return parser


def build(args: argparse.Namespace, base: ClientProfile) -> tuple[list[ClientProfile], int]:
    """The profiles asked for, each a copy of ``base`` (the options' figures) with the trace's
    figures, and how many FLASH devices were skipped for a trace of zero span."""
    flash: list[tuple[str, float]] = []
    skipped: list[str] = []
    if args.flash is not None:
        availability, skipped = load_flash_availability(args.flash)
        if args.fedscale is None:
            uids = choose(list(availability), args.clients, args.seed)
            named = [replace(base, name=f"flash-{u}", availability=availability[u]) for u in uids]
            return named, len(skipped)
        n = None if args.clients is None else min(args.clients, len(availability))
        flash = [(uid, availability[uid]) for uid in choose(list(availability), n, args.seed)]
    capacity = load_fedscale_capacity(args.fedscale)
    profiles = []
    for i, cid in enumerate(choose(list(capacity), args.clients, args.seed)):
        ms, kbps = capacity[cid]
        name, share = f"fedscale-{cid}", base.availability
        if flash:  # the i-th capacity client gets the i-th FLASH device's availability
            uid, share = flash[i % len(flash)]
            name += f"+flash-{uid}"
        gflops = fedscale_gflops(ms, args.reference_gflop)
        try:
            profiles.append(
                replace(
                    base,
                    name=name,
                    uplink_mbps=kbps / 1000,
                    downlink_mbps=kbps / 1000,
                    gflops=gflops,
                    availability=share,
                )
            )
        except ProfileError as exc:
            raise ProfileError(
                f"FedScale capacity {args.fedscale}, client {cid} (computation {ms!r} ms, "
                f"communication {kbps!r} kbit/s): {exc}"
            ) from None
    return profiles, len(skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the CSV and say what it holds; a bad input is one line on stderr and exit 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.fedscale is None and args.flash is None:
        parser.error("name a trace: --fedscale FILE, --flash FILE or both")
    alone = (args.gflops, args.uplink_mbps, args.downlink_mbps)
    if args.fedscale is not None:
        if args.reference_gflop is None:
            parser.error("--reference-gflop is required with --fedscale")
        if not (math.isfinite(args.reference_gflop) and args.reference_gflop > 0):
            parser.error(f"--reference-gflop {args.reference_gflop} must be finite and > 0")
        if any(v is not None for v in alone):
            parser.error("--gflops/--uplink-mbps/--downlink-mbps come from --fedscale")
    elif any(v is None for v in alone):
        parser.error("--flash alone needs --gflops, --uplink-mbps and --downlink-mbps")
    if args.flash is not None and args.availability is not None:
        parser.error("--availability comes from --flash")
    gflops, up, down = (1.0 if v is None else v for v in alone)
    share = 1.0 if args.availability is None else args.availability
    try:  # the options' figures, checked once against the profile ranges
        base = ClientProfile(
            "options",
            up,
            down,
            args.latency_s,
            gflops,
            share,
            args.dropout,
            args.radio,
            args.j_per_gflop,
        )
    except ProfileError as exc:
        parser.error(str(exc).replace("client profile 'options': ", "option "))
    try:
        profiles, skipped = build(args, base)
        write_profiles(args.out, profiles)
    except (ProfileError, OSError, RunDirError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    medians = [
        np.median([getattr(p, c) for p in profiles])
        for c in ("gflops", "uplink_mbps", "availability")
    ]
    print(
        f"wrote {len(profiles)} profiles to {args.out}: median {medians[0]:.4g} GFLOP/s, "
        f"uplink {medians[1]:.4g} Mbit/s, availability {medians[2]:.3g}"
        + (f" ({skipped} FLASH devices skipped: a trace of one instant)" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
