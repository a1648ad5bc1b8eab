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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PACKET_BYTES = 1500  # mahimahi's PACKET_SIZE: the bytes one delivery opportunity carries
# reading a trace: more lines than any recorded trace we know of (the longest mahimahi trace,
# Verizon-LTE-driving, has about 1.5 million)
MAX_OPPORTUNITIES = 50_000_000


class TraceError(ValueError):
    """A link trace is not what mahimahi reads; the message names the file and line."""


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
    modification time: rows share traces)."""
    try:
        resolved = Path(path).resolve()
        stat = resolved.stat()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise TraceError(f"link trace {path}: cannot be read ({exc})") from exc
    if not resolved.is_file():
        raise TraceError(f"link trace {path}: is not a regular file")
    return _read(str(resolved), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read(path: str, _mtime_ns: int, _size: int) -> LinkTrace:
    opener = gzip.open if path.endswith(".gz") else open
    times: list[int] = []
    previous = 0
    try:
        with opener(path, "rt", encoding="ascii") as lines:  # line by line: the cap holds
            for number, line in enumerate(lines, start=1):
                cell = line.strip()
                if not cell:
                    continue
                if not cell.isdigit():
                    raise TraceError(
                        f"link trace {path} line {number}: {cell[:40]!r} is not a whole number "
                        "of milliseconds (mahimahi's format: one delivery opportunity per line)"
                    )
                ms = int(cell)
                if ms < previous:
                    raise TraceError(
                        f"link trace {path} line {number}: {ms} ms comes after {previous} ms; "
                        "timestamps must not decrease"
                    )
                times.append(ms)
                previous = ms
                if len(times) > MAX_OPPORTUNITIES:
                    raise TraceError(f"link trace {path}: more than {MAX_OPPORTUNITIES} lines")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise TraceError(f"link trace {path}: cannot be read as text ({exc})") from exc
    if not times:
        raise TraceError(f"link trace {path}: no timestamps (an empty file is no link)")
    if times[-1] == 0:
        raise TraceError(
            f"link trace {path}: the last timestamp is 0 ms; a trace must last > 0 ms "
            "(its last timestamp is the period it repeats with)"
        )
    return LinkTrace(path, tuple(times))


def offset_s(trace_period_ms: float, u: float) -> float:
    """A client's start into its traces: ``u`` in [0, 1) of the longer period, whole ms."""
    return math.floor(u * trace_period_ms) / 1000.0
