"""Profiles as CSV: the ``profile-trace`` a user writes and the ``profiles.csv`` a run saves.

A trace has one row per client (rows wrap when there are more partitions). Its required
columns are TRACE_COLUMNS; OPTIONAL_COLUMNS add recorded links (mahimahi files, paths relative
to the CSV; an empty cell: the row's constant rate), the radio's power model and the
device's joules per GFLOP. ``profiles.csv`` writes every column, and DERIVED_COLUMNS: a
reader places each row by its ``partition`` (ids 0..n-1, each once) and ignores
``trace_offset_s`` (it follows from the partition and the seed), so a run's profiles.csv
reads back as a trace of the same clients, however its rows were sorted.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adc_flwr.population.energy import REFERENCE_J_PER_GFLOP, REFERENCE_RADIO
from adc_flwr.population.links import LinkTrace, TraceError, quote, read_link_trace
from adc_flwr.population.profiles import (
    RULES,
    ClientProfile,
    ProfileError,
    assign_profiles,
    obeys,
)
from adc_flwr.run.input_root import InputPathError, check_input

TRACE_COLUMNS: tuple[str, ...] = ("name", *RULES)
OPTIONAL_COLUMNS: tuple[str, ...] = ("radio", "j_per_gflop", "uplink_trace", "downlink_trace")
DERIVED_COLUMNS: tuple[str, ...] = ("partition", "trace_offset_s")
# a rate written beside a trace must be the trace's mean to this relative tolerance
MEAN_TOLERANCE = 1e-3


def _number(column: str, text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{where}: {quote(text)} is not a number") from None
    if not math.isfinite(value):
        raise ProfileError(f"{where}: {quote(text)} is not finite")
    if column in RULES and not obeys(column, value):
        raise ProfileError(f"{where}: {value!r} is out of range (must be {RULES[column][2]})")
    return value


def _row(cells: dict[str, str], base: Path, where: str) -> ClientProfile:
    """One client from its cells; ``where`` names the file and line for errors."""

    def at(column: str) -> str:
        return f"{where}, column {column!r}"

    name = cells["name"].strip()
    if not name:
        raise ProfileError(f"{at('name')}: the name is empty")
    values: dict[str, object] = {"name": name}
    for link in ("uplink", "downlink"):
        rate_column, trace_column = f"{link}_mbps", f"{link}_trace"
        rate, named = cells[rate_column].strip(), cells.get(trace_column, "").strip()
        if not named:
            values[rate_column] = _number(rate_column, rate, at(rate_column))
            continue
        file = Path(named) if Path(named).is_absolute() else base / named
        try:
            trace = read_link_trace(file)
        except TraceError as exc:
            raise ProfileError(f"{at(trace_column)}: {exc}") from None
        if rate:
            given = _number(rate_column, rate, at(rate_column))
            if abs(given - trace.mean_mbps) > MEAN_TOLERANCE * trace.mean_mbps:
                raise ProfileError(
                    f"{at(rate_column)}: {given!r} Mbit/s beside {trace_column} {named}, whose "
                    f"mean is {trace.mean_mbps:.6g} Mbit/s; leave the cell empty or write the mean"
                )
        values[rate_column], values[trace_column] = trace.mean_mbps, trace
    for column in ("latency_s", "gflops", "availability", "dropout"):
        values[column] = _number(column, cells[column], at(column))
    values["radio"] = cells.get("radio", "").strip() or REFERENCE_RADIO.name
    j_per_gflop = cells.get("j_per_gflop", "").strip()
    values["j_per_gflop"] = (
        _number("j_per_gflop", j_per_gflop, at("j_per_gflop"))
        if j_per_gflop
        else REFERENCE_J_PER_GFLOP
    )
    try:
        return ClientProfile(**values)  # type: ignore[arg-type]
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _rows(reader: Any, where: str) -> Iterator[list[str]]:
    """The reader's rows; a line csv cannot parse (e.g. a field past its size limit) is a
    ProfileError naming the line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ProfileError(f"{where} line {reader.line_num}: {exc}") from None


def read_trace(path: str | Path) -> list[ClientProfile]:
    """Profiles from a CSV with a TRACE_COLUMNS header (see the module's docstring), in the
    order of their ``partition`` column when it has one."""
    where = f"profile-trace {path}"
    try:
        text = check_input(path).read_text(encoding="utf-8-sig")  # tolerate a spreadsheet's BOM
    except InputPathError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: cannot be read ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    header = [c.strip() for c in next(_rows(reader, where), [])]
    if not any(header):
        raise ProfileError(f"{where} line 1: empty; a header {','.join(TRACE_COLUMNS)} is required")
    known = (*TRACE_COLUMNS, *OPTIONAL_COLUMNS, *DERIVED_COLUMNS)
    for column in header:
        if column not in known or header.count(column) > 1:
            optional = OPTIONAL_COLUMNS + DERIVED_COLUMNS
            wanted = f"each of {TRACE_COLUMNS} once, optionally {optional}"
            raise ProfileError(
                f"{where} line 1, column {quote(column)}: unknown or repeated; {wanted}"
            )
    for column in TRACE_COLUMNS:
        if column not in header:
            raise ProfileError(f"{where} line 1, column {column!r}: missing from the header")
    base = Path(path).parent
    profiles: list[ClientProfile] = []
    ids: list[tuple[str, int]] = []  # each row's partition cell and line
    for cells in _rows(reader, where):
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank lines (e.g. a trailing one) carry no client
        if len(cells) != len(header):
            column = header[len(cells)] if len(cells) < len(header) else f"#{len(header) + 1}"
            raise ProfileError(
                f"{where} line {line}, column {column!r}: "
                f"{len(cells)} cells where the header has {len(header)}"
            )
        row = dict(zip(header, cells, strict=True))
        profiles.append(_row(row, base, f"{where} line {line}"))
        ids.append((row.get("partition", "").strip(), line))
    if not profiles:
        raise ProfileError(f"{where} line 2: no client rows after the header")
    return _by_partition(profiles, ids, where) if "partition" in header else profiles


def _by_partition(
    profiles: list[ClientProfile], ids: list[tuple[str, int]], where: str
) -> list[ClientProfile]:
    """The rows placed by their ``partition`` cells, which must be 0..n-1, each once."""
    n = len(profiles)
    order: dict[int, int] = {}
    for row, (cell, line) in enumerate(ids):
        partition = int(cell) if cell.isdecimal() and len(cell) <= 12 else -1
        if not 0 <= partition < n or partition in order:
            raise ProfileError(
                f"{where} line {line}, column 'partition': {quote(cell)} is not one of "
                f"0..{n - 1} or repeats; the file's {n} rows need the ids 0..{n - 1}, each once "
                "(or no partition column: rows in file order)"
            )
        order[partition] = row
    return [profiles[order[p]] for p in range(n)]


def write_profiles(
    path: str | Path, profiles: Sequence[ClientProfile], relative: bool = False
) -> None:
    """Write every column atomically; floats as repr, so read_trace is exact. Trace paths are
    absolute (the file reads back from anywhere), or with ``relative`` relative to the file
    (a trace shipped beside its files)."""
    from adc_flwr.run.files import atomic_write_text

    def where(trace: LinkTrace | None) -> str:
        if trace is None:
            return ""
        return os.path.relpath(trace.path, Path(path).resolve().parent) if relative else trace.path

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("partition", *TRACE_COLUMNS, *OPTIONAL_COLUMNS, "trace_offset_s"))
    for p, profile in enumerate(profiles):
        numbers = (repr(float(getattr(profile, c))) for c in TRACE_COLUMNS[1:])
        traces = (where(t) for t in (profile.uplink_trace, profile.downlink_trace))
        energy = (profile.radio, repr(profile.j_per_gflop))
        writer.writerow((p, profile.name, *numbers, *energy, *traces, repr(profile.trace_offset_s)))
    atomic_write_text(Path(path), buffer.getvalue())


def run_profiles(
    mix: str, num_partitions: int, seed: int, trace: str | Path | None
) -> list[ClientProfile]:
    """The run's profiles: ``profile-trace``'s rows when it names a file, else the mix."""
    rows = read_trace(trace) if trace else None
    return assign_profiles(mix, num_partitions, seed, rows)
