"""The scheduler's parts (qvl_batch/run/schedule.py): the unit queue and the committer."""

from __future__ import annotations

import threading

from qvl_batch.rows.manifest import WorkUnit
from qvl_batch.run.schedule import MAX_BACKOFF_S, Committer, UnitQueue


def _units(n: int) -> list[WorkUnit]:
    return [WorkUnit(f"u{i}", 0, "mem://s", 10 * i, 10) for i in range(n)]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_planned_units_in_order_then_a_retry_once_its_backoff_is_over():
    clock = Clock()
    a, b = _units(2)
    queue = UnitQueue(iter([a, b]), max_attempts=3, clock=clock)
    assert queue.next() == (a, 1)
    assert queue.retry(a, 1, "read failed") is None
    assert queue.next() == (b, 1), "a retry waits out its backoff"
    assert queue.next() is None and not queue.planned_left and queue.waiting
    clock.t += MAX_BACKOFF_S  # past any backoff
    assert queue.next() == (a, 2) and queue.empty
    assert queue.retried == 1


def test_the_last_attempt_fails_the_unit_and_an_isolation_step_uses_none():
    clock = Clock()
    (a,) = _units(1)
    queue = UnitQueue(iter([a]), max_attempts=2, clock=clock)
    queue.next()
    queue.again(a, 1)  # its actor died with a suspect row inside: at once, same attempt
    assert queue.next() == (a, 1)
    assert queue.retry(a, 1, "x") is None
    clock.t += MAX_BACKOFF_S
    assert queue.next() == (a, 2)
    assert queue.retry(a, 2, "still broken") == "unit u0 failed 2 times; last error: still broken"
    assert queue.next() is None and queue.empty and queue.retried == 3


def test_committer_books_every_commit_and_reports_the_first_failure():
    committer = Committer(threads=2, pending_per_thread=1)
    gate = threading.Event()

    def write(n):
        gate.wait(10)
        if n == 2:
            raise OSError("disk full")
        return n

    booked = []

    def book(fut, key):
        try:
            booked.append((key, fut.result()))
        except OSError as exc:
            return f"{key}: {exc}"
        return None

    committer.submit(write, 1, key="one")
    assert not committer.full
    committer.submit(write, 2, key="two")
    assert committer.full and len(committer) == 2
    assert committer.settle(book, timeout=0) is None, "nothing done yet: nothing booked"
    gate.set()
    assert committer.drain(book) == "two: disk full"
    assert booked == [("one", 1)] and len(committer) == 0
    committer.shutdown()


def test_settle_waits_only_as_long_as_asked():
    committer = Committer(threads=1)
    gate = threading.Event()
    committer.submit(gate.wait, 10, key="k")
    assert committer.settle(lambda f, k: "booked", timeout=0.01) is None, "nothing done yet"
    assert len(committer) == 1
    gate.set()
    committer.drain(lambda f, k: None)
    committer.shutdown()
