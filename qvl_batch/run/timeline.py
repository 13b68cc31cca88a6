"""What an actor did over time: seconds per state in fixed-width bins of wall-clock time.

States: ``busy`` (the engine holds rows), ``waiting`` (the engine is empty while the actor has
units: rows are being read or decoded), ``idle`` (the actor has no unit: the driver gave it
nothing). Wall time (not a monotonic clock) so the driver can place every actor on the job's
own axis; bins double in width as a job grows, so a night-long job stays a few KiB.
"""

from __future__ import annotations

import time

STATES = ("busy", "waiting", "idle")


class StateTimeline:
    def __init__(self, bin_s: float = 1.0, max_bins: int = 2048, origin: float | None = None):
        self.origin = time.time() if origin is None else origin
        self.bin_s = bin_s
        self.max_bins = max_bins
        self.bins: dict[str, list[float]] = {s: [] for s in STATES}

    def add(self, state: str, start: float, end: float) -> None:
        """``end - start`` seconds (wall times) spent in ``state``, spread over their bins."""
        start = max(start, self.origin)
        while start < end:
            index = int((start - self.origin) // self.bin_s)
            while index >= self.max_bins:
                self._coarsen()
                index = int((start - self.origin) // self.bin_s)
            stop = min(end, self.origin + (index + 1) * self.bin_s)
            for series in self.bins.values():
                series.extend([0.0] * (index + 1 - len(series)))
            self.bins[state][index] += stop - start
            start = stop

    def _coarsen(self) -> None:
        self.bin_s *= 2
        for state, series in self.bins.items():
            self.bins[state] = [sum(series[i : i + 2]) for i in range(0, len(series), 2)]

    def snapshot(self) -> dict:
        return {
            "origin": self.origin,
            "bin_s": self.bin_s,
            **{s: [round(v, 3) for v in series] for s, series in self.bins.items()},
        }
