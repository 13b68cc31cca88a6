"""Progress: a bar (rows, rows/s, ETA, errors) on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("qvl_batch")


# An engine silent this long is named on the progress line (the watchdog acts at stall_s).
QUIET_SHOWN_S = 30.0


class Progress:
    """Counts rows as units commit, and rows finished in units still running (from the actors'
    heartbeats). ``done_before`` are rows committed by earlier runs."""

    def __init__(self, total: int, done_before: int = 0, interval_s: float = 10.0, bar=None):
        self.total = total
        self.done_before = done_before
        self.rows = 0
        self.errors = 0
        self.running_rows = 0  # finished inside units not yet committed
        self.quiet_s = 0.0  # the longest any working engine has been silent
        self.start = time.monotonic()
        self.interval_s = interval_s
        self._last_line = self.start
        self._actors = ""  # "live/total" once the driver reports it
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=done_before, unit="row", dynamic_ncols=True, smoothing=0.1
            )

    @property
    def rate(self) -> float:
        """Rows finished per second, running units' included."""
        elapsed = time.monotonic() - self.start
        return (self.rows + self.running_rows) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        left = max(0, self.total - self.done_before - self.rows - self.running_rows)
        return left / self.rate if self.rate > 0 else None

    def update(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        self._show(rows)

    def running(self, rows: int, quiet_s: float) -> None:
        """Rows finished in the units running now, and the longest silence of an engine with
        rows inside (the driver reads both from the actors' heartbeats)."""
        # a unit's backup copy reports its rows too: never more running than rows left
        left = max(0, self.total - self.done_before - self.rows)
        self.running_rows, self.quiet_s = min(rows, left), quiet_s
        self._show(0)

    def _show(self, committed: int) -> None:
        if self._bar is not None:
            self._bar.update(committed)
            self._bar.set_postfix(
                errors=self.errors,
                running=self.running_rows or None,
                quiet=f"{self.quiet_s:.0f}s" if self.quiet_s >= QUIET_SHOWN_S else None,
                actors=self._actors or None,
                refresh=False,
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            log.info(self.line())

    def actors(self, live: int, total: int) -> None:
        """How many actors are live now (shown with the rows; logged as it changes)."""
        self._actors = f"{live}/{total}"
        if self._bar is not None:
            self._bar.set_postfix(errors=self.errors, actors=self._actors, refresh=False)
        else:
            log.info("actors live: %s", self._actors)

    def line(self) -> str:
        done = self.done_before + self.rows
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = self.eta_s()
        eta_txt = f"{eta:,.0f}s" if eta is not None else "?"
        return (
            f"progress: {done:,}/{self.total:,} rows ({pct:.1f}%)"
            + (f" +{self.running_rows:,} running" if self.running_rows else "")
            + f", {self.rate:,.1f} rows/s, ETA {eta_txt}, {self.errors:,} errors"
            + (f", actors {self._actors}" if self._actors else "")
            + (f", an engine quiet {self.quiet_s:,.0f}s" if self.quiet_s >= QUIET_SHOWN_S else "")
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
