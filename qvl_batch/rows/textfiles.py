"""CSV and JSON lines files as row sources: one record (CSV) or non-empty line (JSONL) a row.

Planning scans each file once and keeps the byte offset of every ``GROUP_ROWS``-th row, so a
unit reads only its own byte range (one ranged read) however large the file. A record that
cannot be read becomes a MALFORMED_INPUT row, never a failed job.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import RowError

# Rows between kept offsets: what a unit reads past its own rows at most, in exchange for a plan
# that holds 1/64 of the offsets (a 10M-line manifest keeps ~156k of them).
GROUP_ROWS = 64


@dataclass
class Layout:
    """A scanned file: its rows, the byte offset of each group of rows (and the end), where the
    header ends (CSV), the columns seen, and per-file facts a format keeps (Batch settings)."""

    rows: int = 0
    offsets: list[int] = field(default_factory=list)
    header_end: int = 0
    columns: set[str] = field(default_factory=set)
    facts: dict[str, Any] = field(default_factory=dict)

    def row_start(self, start: int) -> None:
        if self.rows % GROUP_ROWS == 0:
            self.offsets.append(start)
        self.rows += 1

    def group_rows(self) -> tuple[int, ...]:
        full, rest = divmod(self.rows, GROUP_ROWS)
        return (GROUP_ROWS,) * full + ((rest,) if rest else ())


def malformed(message: str) -> dict[str, Any]:
    return {"_error": (RowError.MALFORMED_INPUT, message)}


# ---- JSON lines -----------------------------------------------------------------------------
def jsonl_lines(fh, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, stripped line) of each non-empty line from ``start``."""
    pos = start
    for line in fh:
        stripped = line.strip()
        if stripped:
            yield pos, stripped
        pos += len(line)


def scan_jsonl(fh, size: int, on_line=None) -> Layout:
    """Count rows, keep group offsets and the keys seen; ``on_line(obj)`` sees each object."""
    layout = Layout()
    for pos, line in jsonl_lines(fh):
        layout.row_start(pos)
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            layout.columns.update(obj)
            if on_line is not None:
                on_line(obj, layout)
    layout.offsets.append(size)
    return layout


def parse_json_object(line: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return malformed(f"{where}: not JSON ({exc})")
    if not isinstance(obj, dict):
        return malformed(f"{where}: a JSON {type(obj).__name__}, not an object")
    return obj


# ---- CSV ------------------------------------------------------------------------------------
def _dialect(url: str) -> dict[str, str]:
    return {"delimiter": "\t"} if url.lower().endswith(".tsv") else {}


def _counted_lines(fh, start: int, pos: list[int]) -> Iterator[str]:
    """Decoded lines; ``pos[0]`` is the byte offset after the last line handed out, so after
    csv.reader returns a record it is where the record ends (quoted newlines included)."""
    pos[0] = start
    for raw in fh:
        pos[0] += len(raw)
        yield raw.decode("utf-8", errors="replace")


def _header(record: list[str]) -> list[str]:
    return [name.lstrip("\ufeff").strip() for name in record]


def scan_csv(fh, size: int, url: str) -> Layout:
    layout, pos = Layout(), [0]
    reader = csv.reader(_counted_lines(fh, 0, pos), **_dialect(url))
    start = 0
    for record in reader:
        if not record:
            start = pos[0]
            continue
        if not layout.header_end:
            layout.header_end = pos[0]
            layout.columns = set(_header(record))
        else:
            layout.row_start(start)
        start = pos[0]
    layout.offsets.append(size)
    return layout


def csv_rows(head: bytes, body: bytes, url: str, first_line: int = 0) -> list[dict[str, Any]]:
    """The records of ``body`` as dicts by the header in ``head``; a record whose field count
    differs from the header's is MALFORMED_INPUT."""
    dialect = _dialect(url)
    names = _header(next(csv.reader(io.StringIO(head.decode("utf-8", "replace")), **dialect)))
    rows = []
    text = io.StringIO(body.decode("utf-8", errors="replace"), newline="")
    for record in csv.reader(text, **dialect):
        if not record:
            continue
        if len(record) != len(names):
            rows.append(
                malformed(
                    f"{posixpath.basename(url)}: a record with {len(record)} fields; the header "
                    f"has {len(names)}"
                )
            )
            continue
        rows.append({k: (v if v != "" else None) for k, v in zip(names, record)})
    return rows
