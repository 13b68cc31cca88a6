"""The exactly-once rule, once: which of a unit's rows a set of results covers.

Every row of ``[start, stop)`` must appear exactly once. The writer applies it to an actor's
answer before it commits (a unit that fails it is retried, never written), ``retry-failed`` to
the rows it re-ran, and ``verify`` to what ``data/`` and ``errors/`` hold for each unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Coverage:
    missing: np.ndarray  # rows of the range that no result covers
    duplicated: np.ndarray  # rows covered more than once
    outside: np.ndarray  # results for rows outside the range

    @property
    def exact(self) -> bool:
        return not (self.missing.size or self.duplicated.size or self.outside.size)

    def describe(self, examples: int = 5) -> str:
        """``3 missing [..]; 1 duplicated [..]``: what is wrong, with a few rows of each."""
        parts = [
            f"{rows.size} {what} {rows[:examples].tolist()}"
            for what, rows in (
                ("missing", self.missing),
                ("duplicated", self.duplicated),
                ("outside", self.outside),
            )
            if rows.size
        ]
        return "; ".join(parts) or "exact"


def coverage(rows, start: int, stop: int | None = None, *, expected=None) -> Coverage:
    """How ``rows`` (source_row values, any order) cover ``[start, stop)``, or the rows in
    ``expected`` when given (a subset of a unit: retry-failed)."""
    rows = np.asarray(rows, dtype=np.int64)
    want = (
        np.unique(np.asarray(expected, dtype=np.int64))
        if expected is not None
        else np.arange(start, stop, dtype=np.int64)
    )
    uniq, counts = np.unique(rows, return_counts=True)
    return Coverage(
        missing=np.setdiff1d(want, uniq),
        duplicated=uniq[counts > 1],
        outside=np.setdiff1d(uniq, want),
    )
