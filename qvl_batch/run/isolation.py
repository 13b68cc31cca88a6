"""Crash isolation: which rows must run alone, and which to give up on, after actor deaths.

When an engine kills its process (a segfault, a CUDA error, OOM on one huge input) or stalls
(no result for ``limits.stall_s``: liveness.py), every row in the engine at that moment is a
suspect (the FlightRecorder knows which). Suspects run alone on the next attempt; a row whose
process dies while it runs alone ``limits.max_row_crashes`` times (2) is not run again and
becomes an error row: ENGINE_STALL if its last death alone was a stall, else ENGINE_CRASH. So a
poison row costs about three actor restarts and never blocks its unit, and one transient crash
condemns nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import RowError


@dataclass
class _Suspects:
    solo: set[int] = field(default_factory=set)
    alone_crashes: Counter = field(default_factory=Counter)
    condemned: dict[int, RowError] = field(default_factory=dict)  # row -> its error code


class CrashIsolation:
    """Per unit: rows to run alone and rows to skip, learnt from what the engine held at a death."""

    def __init__(self, max_row_crashes: int = 2) -> None:
        self.max_row_crashes = max_row_crashes
        self._units: dict[str, _Suspects] = {}

    def learn(self, unit_id: str, crash_keys: list[tuple[str, int]], stalled: bool = False) -> bool:
        """Record a death (``stalled``: the engine stopped answering) with ``crash_keys``
        (unit id, row index) in the engine.

        Returns True if rows of ``unit_id`` were among them.
        """
        mine = sorted(i for u, i in crash_keys if u == unit_id)
        if not mine:
            return False
        s = self._units.setdefault(unit_id, _Suspects())
        if len(crash_keys) == 1:  # it ran alone: this row (or bad luck) killed the process
            row = mine[0]
            s.alone_crashes[row] += 1
            if s.alone_crashes[row] >= self.max_row_crashes:
                s.condemned[row] = RowError.ENGINE_STALL if stalled else RowError.ENGINE_CRASH
                s.solo.discard(row)
            else:
                s.solo.add(row)
        else:
            s.solo.update(mine)
        return True

    def process_args(self, unit_id: str) -> tuple:
        """Extra arguments for ``UnitWorker.process_unit``: (solo rows, {row to skip: code})."""
        s = self._units.get(unit_id)
        return () if s is None else (sorted(s.solo), dict(sorted(s.condemned.items())))

    def forget(self, unit_id: str) -> None:
        self._units.pop(unit_id, None)
