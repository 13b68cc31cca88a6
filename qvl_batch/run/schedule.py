"""Two parts of the scheduler that ``run`` and ``retry-failed`` share with the hand-out policy
(``handout.py``): the queue of units still to run, and the committer.

- :class:`UnitQueue`: the planned units not yet handed out, then those to run again: a unit
  that failed is retried after an exponential backoff with jitter, up to
  ``limits.max_unit_attempts``; a unit whose actor died with a suspect row inside goes back at
  once with no attempt used (crash isolation needs that run).
- :class:`Committer`: results are written by a small thread pool (part files, then the
  marker), so object-store latency overlaps with handing out work; at most ``max_pending``
  results wait there, which bounds the driver's memory.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

from ..rows.manifest import WorkUnit

MAX_BACKOFF_S = 30.0


@dataclass
class _Retry:
    unit: WorkUnit
    attempt: int
    not_before: float


class UnitQueue:
    def __init__(self, todo: Iterator[WorkUnit], max_attempts: int, clock=time.monotonic):
        self._todo = todo
        self._todo_left = True
        self._retries: deque[_Retry] = deque()
        self.max_attempts = max_attempts
        self.clock = clock
        self.retried = 0  # units sent back, isolation steps included

    def next(self) -> tuple[WorkUnit, int] | None:
        """The next (unit, attempt) to hand out: a retry whose backoff is over, else the next
        planned unit; None if neither is ready now."""
        now = self.clock()
        for _ in range(len(self._retries)):
            r = self._retries.popleft()
            if r.not_before <= now:
                return r.unit, r.attempt
            self._retries.append(r)
        unit = next(self._todo, None) if self._todo_left else None
        self._todo_left = unit is not None
        return (unit, 1) if unit is not None else None

    def retry(self, unit: WorkUnit, attempt: int, reason: str) -> str | None:
        """Run ``unit`` again after a backoff; a failure message if it used its last attempt."""
        self.retried += 1
        if attempt >= self.max_attempts:
            return f"unit {unit.unit_id} failed {attempt} times; last error: {reason}"
        backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
        self._retries.append(_Retry(unit, attempt + 1, self.clock() + backoff))
        return None

    def again(self, unit: WorkUnit, attempt: int) -> None:
        """Run ``unit`` again at once, on the same attempt (an isolation step)."""
        self.retried += 1
        self._retries.append(_Retry(unit, attempt, self.clock()))

    @property
    def planned_left(self) -> bool:
        """Planned units may remain (False once the plan is exhausted)."""
        return self._todo_left

    @property
    def waiting(self) -> bool:
        """Units wait to be retried (their backoff may not be over)."""
        return bool(self._retries)

    @property
    def empty(self) -> bool:
        return not self._todo_left and not self._retries


class Committer:
    """Writes results in a thread pool; :meth:`settle` books the commits that are done."""

    def __init__(self, threads: int, pending_per_thread: int = 4):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="commit")
        self.max_pending = pending_per_thread * threads
        self._pending: dict[Future, Any] = {}

    def submit(self, fn: Callable, *args, key: Any = None) -> None:
        self._pending[self._pool.submit(fn, *args)] = key

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_pending

    def __len__(self) -> int:
        return len(self._pending)

    def settle(self, book: Callable[[Future, Any], str | None], timeout: float) -> str | None:
        """Book every commit that is done (waiting up to ``timeout`` for a first one) with
        ``book(future, key)``; returns the first failure message, if any."""
        if not self._pending:
            return None
        done, _ = futures_wait(list(self._pending), timeout=timeout, return_when=FIRST_COMPLETED)
        problems = [book(fut, self._pending.pop(fut)) for fut in done]
        return next((p for p in problems if p), None)

    def drain(self, book: Callable[[Future, Any], str | None]) -> str | None:
        """Wait for every commit in flight and book it (results handed over are written even
        after a failure); returns the first failure message, if any."""
        done = futures_wait(list(self._pending)).done
        problems = [book(fut, self._pending.pop(fut)) for fut in done]
        return next((p for p in problems if p), None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
