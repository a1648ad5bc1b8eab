"""Links that vary as recorded ones do: mahimahi's delivery-opportunity traces.

A mahimahi trace (ravinet/mahimahi, the ``mm-link`` shell) lists, one per line, the
millisecond at which the link can deliver one 1500-byte packet; several lines with one
millisecond are several packets in it. When the list runs out it starts again, shifted by its
last timestamp (``LinkQueue::use_a_delivery_opportunity``), so the last timestamp is the
trace's period. ``LinkQueue::rationalize`` burns every opportunity at or before a packet's
arrival millisecond before the packet is queued, so a transfer that starts at t is carried by
the opportunities strictly after t; a message's bytes fill each opportunity as a stream
(mahimahi splits a packet across opportunities too) and ``n`` bytes end with the
``ceil(n / 1500)``-th of them. Headers and queueing behind other traffic are not modelled:
one client's message has its link to itself.
"""

from __future__ import annotations

import gzip
import math
import zlib
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO

from adc_flwr.run.input_root import InputPathError, check_input

PACKET_BYTES = 1500  # mahimahi's PACKET_SIZE: the bytes one delivery opportunity carries
# reading a trace: more lines than any recorded trace we know of (the longest mahimahi trace,
# Verizon-LTE-driving, has about 1.5 million)
MAX_OPPORTUNITIES = 50_000_000
# a line holds one timestamp: 50 million gaps of MAX_GAP_MS stay under 15 digits
MAX_LINE_CHARS = 64
# physical ranges (docs/population.md): the mean as a constant link's range (profiles.RULES);
# the longest time without a delivery opportunity above the longest outage in mahimahi's
# recordings (78.3 s, ATT-LTE-driving.up) and below Linux's ~924.6 s after which TCP gives up
# on a connection that gets no ACK (tcp_retries2 = 15): a longer silence is no link
MAX_MEAN_MBPS = 1e5
MAX_GAP_MS = 900_000
QUOTE_CHARS = 24  # an error quotes at most this much of a file's text: the offending token


class TraceError(ValueError):
    """A link trace is not what mahimahi reads; the message names the file and line."""


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """The offending token of a file's text for an error, as a repr: at most ``limit``
    characters (a foreign file's content is never echoed beyond that)."""
    token = str(text).strip()
    return repr(token[:limit]) + ("..." if len(token) > limit else "")


@dataclass(frozen=True, eq=False)
class LinkTrace:
    """One recorded link: the millisecond of each delivery opportunity, repeating."""

    path: str
    times_ms: tuple[int, ...] = field(repr=False)  # nondecreasing, the last > 0: the period
    mean_mbps: float = field(init=False)  # bits the trace delivers per period, per second

    def __post_init__(self) -> None:
        if not self.times_ms or self.times_ms[-1] <= 0:
            raise TraceError(f"link trace {self.path}: needs a last timestamp > 0 ms")
        mean = len(self.times_ms) * PACKET_BYTES * 8 / (self.times_ms[-1] / 1000) / 1e6
        object.__setattr__(self, "mean_mbps", mean)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinkTrace) and (self.path, self.times_ms) == (
            other.path,
            other.times_ms,
        )

    def __hash__(self) -> int:
        return hash((self.path, len(self.times_ms), self.times_ms[-1]))

    @property
    def period_ms(self) -> int:
        return self.times_ms[-1]

    def finish_ms(self, start_ms: float, nbytes: int) -> float:
        """The millisecond at which ``nbytes`` sent at ``start_ms`` have all been delivered."""
        needed = -(-int(nbytes) // PACKET_BYTES)
        if needed <= 0:
            return start_ms
        times, period = self.times_ms, self.times_ms[-1]
        cycle, into = divmod(start_ms, period)
        first = bisect_right(times, into)  # the opportunities strictly after the start
        last = int(cycle) * len(times) + first + needed - 1
        last_cycle, index = divmod(last, len(times))
        return float(last_cycle * period + times[index])

    def transfer_s(self, start_s: float, nbytes: int) -> float:
        """Seconds from ``start_s`` until ``nbytes`` are through (serialisation only)."""
        start_ms = start_s * 1000.0
        return (self.finish_ms(start_ms, nbytes) - start_ms) / 1000.0


def read_link_trace(path: str | Path) -> LinkTrace:
    """A mahimahi trace file, gzipped when its name ends in ``.gz`` (cached per file and
    modification time: rows share traces). Under ``ADC_IN_ROOT`` only (input_root.py)."""
    try:
        resolved = check_input(path)
        stat = resolved.stat()
    except InputPathError as exc:
        raise TraceError(f"link trace {path}: {exc}") from None
    except OSError as exc:
        raise TraceError(f"link trace {path}: cannot be read ({exc})") from exc
    if not resolved.is_file():
        raise TraceError(f"link trace {path}: is not a regular file")
    return _read(str(resolved), stat.st_mtime_ns, stat.st_size)


def gap_problem(ms: int, previous: int) -> str | None:
    """Why an opportunity at ``ms`` after one at ``previous`` is no physical link, or None."""
    if ms < previous:
        return f"{ms} ms comes after {previous} ms; timestamps must not decrease"
    if ms - previous > MAX_GAP_MS:
        return (
            f"{ms - previous} ms without a delivery opportunity (after {previous} ms); the "
            f"longest gap a link may have is {MAX_GAP_MS} ms (docs/population.md)"
        )
    return None


def mean_problem(opportunities: int, period_ms: int) -> str | None:
    """Why a trace of ``opportunities`` per ``period_ms`` is no physical link, or None."""
    mean = opportunities * PACKET_BYTES * 8 / (period_ms / 1000) / 1e6
    if mean > MAX_MEAN_MBPS:
        return (
            f"{opportunities} opportunities in {period_ms} ms are {mean:.6g} Mbit/s; a link's "
            f"mean must be in (0, {MAX_MEAN_MBPS:.0f}] Mbit/s (docs/population.md)"
        )
    return None


def check_physical(times: list[int], where: str) -> None:
    """:class:`TraceError` naming the opportunity (from 1) when ``times`` is no physical link."""
    previous = 0
    for index, ms in enumerate(times, start=1):
        if problem := gap_problem(ms, previous):
            raise TraceError(f"{where}, opportunity {index}: {problem}")
        previous = ms
    if times and times[-1] > 0 and (problem := mean_problem(len(times), times[-1])):
        raise TraceError(f"{where}: {problem}")


def _capped_lines(stream: IO[str]) -> Iterator[str]:
    """The stream's lines, read in blocks so that memory stays bounded: a line longer than
    MAX_LINE_CHARS is cut after the block that holds it (the caller refuses it)."""
    rest = ""
    while block := stream.read(1 << 20):
        *lines, rest = (rest + block).split("\n")
        yield from lines
        if len(rest) > MAX_LINE_CHARS:
            yield rest
            return
    if rest:
        yield rest


def _line_problem(line: str, previous: int) -> str:
    """Why ``line`` (after an opportunity at ``previous`` ms) is no line of a trace."""
    if len(line) > MAX_LINE_CHARS:
        return (
            f"longer than {MAX_LINE_CHARS} characters; a line holds one timestamp in ms "
            "(mahimahi's format)"
        )
    cell = line.strip()
    if not cell.isdigit():
        return (
            f"{quote(cell)} is not a whole number of milliseconds (mahimahi's format: one "
            "delivery opportunity per line)"
        )
    return gap_problem(int(cell), previous) or "unreadable"


@lru_cache(maxsize=16)
def _read(path: str, _mtime_ns: int, _size: int) -> LinkTrace:
    opener = gzip.open if path.endswith(".gz") else open
    times: list[int] = []
    previous = last = 0
    try:
        with opener(path, "rt", encoding="ascii") as stream:
            for number, line in enumerate(_capped_lines(stream), start=1):
                cell = line.strip()
                if len(line) <= MAX_LINE_CHARS and cell.isdigit():
                    ms = int(cell)
                    if previous <= ms <= previous + MAX_GAP_MS:
                        times.append(ms)
                        previous, last = ms, number
                        if len(times) > MAX_OPPORTUNITIES:
                            raise TraceError(
                                f"link trace {path}: more than {MAX_OPPORTUNITIES} lines"
                            )
                        continue
                elif len(line) <= MAX_LINE_CHARS and not cell:
                    continue  # a blank line
                problem = _line_problem(line, previous)
                raise TraceError(f"link trace {path} line {number}: {problem}")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise TraceError(f"link trace {path}: cannot be read as text ({exc})") from exc
    if not times:
        raise TraceError(f"link trace {path}: no timestamps (an empty file is no link)")
    if times[-1] == 0:
        raise TraceError(
            f"link trace {path}: the last timestamp is 0 ms; a trace must last > 0 ms "
            "(its last timestamp is the period it repeats with)"
        )
    if problem := mean_problem(len(times), times[-1]):
        raise TraceError(f"link trace {path} line {last}: {problem}")
    return LinkTrace(path, tuple(times))


def offset_s(trace_period_ms: float, u: float) -> float:
    """A client's start into its traces: ``u`` in [0, 1) of the longer period, whole ms."""
    return math.floor(u * trace_period_ms) / 1000.0
