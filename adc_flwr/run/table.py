"""An append-only CSV of rows keyed by round: ``metrics.csv`` and ``clients.csv``.

Rows are flushed to the OS when written and fsynced by :meth:`RoundTable.flush` (at least
once per round, before the checkpoint). A crash can leave a torn last line; it is dropped, and
a resumed run drops the rows of rounds after its checkpoint (:meth:`truncate_after`), so
rows of an unfinished round are redone, not duplicated. Kept rows stay byte for byte.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from adc_flwr.run.files import RunDirError, write_error

if TYPE_CHECKING:
    import pandas as pd


def _cell(value: Any) -> Any:
    """A CSV cell: blank for None / NaN, Python scalars for 0-d numpy/torch values."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


class RoundTable:
    """One CSV file with fixed ``columns``, one of which is ``round``."""

    def __init__(
        self,
        path: Path,
        columns: Sequence[str],
        atomic_write_text: Callable[[Path, str], None],
        check_row: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self.columns = tuple(columns)
        self._header = ",".join(self.columns)
        self._round_at = self.columns.index("round")
        self._atomic_write_text = atomic_write_text
        self._check_row = check_row
        self._handle: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None

    def _check_header(self, header: str) -> None:
        if header != self._header:
            raise RunDirError(
                f"{self.path} has columns {header!r}, not those of this version "
                f"({self._header}); use a new run-name or out-dir"
            )

    def _open(self) -> tuple[IO[str], csv.DictWriter[str]]:
        """Open for appending; write the header once, drop a torn last line."""
        if self._handle is None or self._writer is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                with self.path.open("rb") as f:
                    first = f.readline().decode("utf-8").rstrip("\r\n")
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                self._check_header(first)
                if torn:  # a crash mid-row: keep whole rows only
                    text = self.path.read_text(encoding="utf-8")
                    self._atomic_write_text(self.path, text[: text.rfind("\n") + 1])
            else:
                self._atomic_write_text(self.path, self._header + "\n")
            self._handle = self.path.open("a", encoding="utf-8", newline="")
            self._writer = csv.DictWriter(
                self._handle, fieldnames=self.columns, lineterminator="\n"
            )
        return self._handle, self._writer

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows (missing columns blank) and flush them to the OS."""
        for row in rows:
            unknown = set(row) - set(self.columns)
            if unknown:
                raise ValueError(
                    f"unknown column(s) {sorted(unknown)} for {self.path.name}; "
                    f"allowed: {', '.join(self.columns)}"
                )
            if self._check_row is not None:
                self._check_row(row)
        try:
            handle, writer = self._open()
            writer.writerows([{k: _cell(v) for k, v in row.items()} for row in rows])
            handle.flush()
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def flush(self) -> None:
        """fsync, so that rows written so far survive a machine crash."""
        if self._handle is not None:
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError as exc:
                raise write_error(self.path, exc) from exc

    def close(self) -> None:
        """fsync and close (a later append reopens)."""
        handle, self._handle, self._writer = self._handle, None, None
        if handle is not None:
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                raise write_error(self.path, exc) from exc
            finally:
                with contextlib.suppress(OSError):
                    handle.close()

    def read(self) -> pd.DataFrame:
        """All rows so far (an empty frame with the columns before the first row)."""
        import pandas as pd  # only readers need pandas

        if not self.path.exists():
            return pd.DataFrame(columns=list(self.columns))
        return pd.read_csv(self.path)

    def _lines(self) -> list[str]:
        """Complete data lines (no header, no torn last line)."""
        if not self.path.exists():
            return []
        return self.path.read_text(encoding="utf-8").split("\n")[1:-1]

    def _round_of(self, line: str) -> float | None:
        value = next(csv.reader([line]))[self._round_at]
        return float(value) if value else None

    def truncate_after(self, server_round: int) -> int:
        """Drop rows of rounds after ``server_round`` and a torn last line; how many lines."""
        self.close()
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").split("\n")
        torn = lines.pop()  # "" when the file ends with a newline
        header, rows = (lines[0], lines[1:]) if lines else ("", [])
        if header:
            self._check_header(header)
        kept = [row for row in rows if (r := self._round_of(row)) is not None and r <= server_round]
        dropped = len(rows) - len(kept) + bool(torn)
        if dropped:
            self._atomic_write_text(self.path, "".join(f"{r}\n" for r in [header, *kept]))
        return dropped

    def count(self, up_to_round: int | None = None, prefix: bytes | None = None) -> int:
        """Complete rows, of rounds up to ``up_to_round`` and starting with ``prefix`` if given."""
        lines = self._lines()
        if prefix is not None:
            lines = [line for line in lines if line.encode("utf-8").startswith(prefix)]
        if up_to_round is None:
            return len(lines)
        return sum(
            1 for line in lines if (r := self._round_of(line)) is not None and r <= up_to_round
        )
