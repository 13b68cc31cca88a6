"""Which actor gets the next unit, and what an idle actor does once nothing is left to hand out.

Four rules keep every GPU busy to the end of a job:

- **Balanced**: a unit goes to the live actor holding the fewest (ties in turn), so every actor
  has one before any has two. Filling one actor to its window first left the other idle (two
  actors on four units ran 3 and 1: a scaling of 0.65 on two H100s).
- **No hoard at start**: while other actors are still starting, a live one holds at most
  :data:`STARTING_DEPTH` units (one running, one read ahead), so the first actor ready (often
  seconds before the others on GPUs) does not take ``units_in_flight_per_actor`` units the
  others will wait for at the tail; its window fills once every actor is up.
- **Move**: an actor runs its units one after the other and only reads ahead the next (see
  actor.py), so a unit queued behind another has not started (its rows may be prepared, or
  wait in a lock-step engine's batching window: the actor gives those back). When an actor is
  idle and the queue is empty, such a unit is taken back from its actor and given to the idle
  one: no unit waits in one actor's queue while another actor has nothing.
- **Backup copy** (``batching.backup_copies``): when an actor is idle, the queue is empty and
  there is nothing to move, it runs a copy of a unit another actor is still running (the one
  handed out last: the most work left); the first complete result commits and the other copy
  is dropped. A straggling GPU or a slow row then costs at most the copy's time. Exactly-once
  holds by construction: the driver commits a unit once (:class:`Runs` knows which are
  settled), a commit writes its marker last, and a restarted driver skips marked units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..rows.manifest import WorkUnit

STARTING_DEPTH = 2  # units a live actor holds while others are still starting


@dataclass
class Outcome:
    """How one hand-out came back: a result table, an error, or the actor died."""

    table: Any = None
    error: str | None = None
    actor_died: bool = False

    @property
    def withdrawn(self) -> bool:
        """The driver took the unit back (moved, or a copy that lost): no result."""
        return self.table is None and self.error is None


@dataclass
class Run:
    """One hand-out of a unit to an actor slot."""

    unit: WorkUnit
    slot: int
    generation: int  # the slot's actor incarnation count when handed out
    attempt: int
    copy: bool  # a backup copy of a unit also running elsewhere
    start_s: float  # seconds since the job started
    started: bool = False  # its actor said it has started it (it cannot be moved)
    dropped: bool = False  # withdrawn: moved elsewhere, or a copy whose twin won
    moved: bool = False  # ...moved: taken back before it started, handed to an idle actor


class Runs:
    """The units in flight, by result ref, by slot (in hand-out order) and by unit."""

    def __init__(self, slots: int) -> None:
        self.by_ref: dict = {}
        self.by_slot: list[list] = [[] for _ in range(slots)]  # refs in hand-out order
        self.by_unit: dict[str, list] = {}
        self.settled: set[str] = set()  # units whose result went to commit this run

    def add(self, ref, run: Run) -> None:
        self.by_ref[ref] = run
        self.by_slot[run.slot].append(ref)
        self.by_unit.setdefault(run.unit.unit_id, []).append(ref)

    def pop(self, ref) -> Run:
        run = self.by_ref.pop(ref)
        self.by_slot[run.slot].remove(ref)
        twins = self.by_unit[run.unit.unit_id]
        twins.remove(ref)
        if not twins:
            del self.by_unit[run.unit.unit_id]
        return run

    def twins(self, unit_id: str) -> list:
        """Refs of the other runs of ``unit_id`` still in flight (not dropped)."""
        return [r for r in self.by_unit.get(unit_id, []) if not self.by_ref[r].dropped]

    def load(self, slot: int) -> int:
        """Units slot ``slot`` is working on (dropped copies finish in the background)."""
        return sum(not self.by_ref[r].dropped for r in self.by_slot[slot])

    def working(self) -> bool:
        """Some run in flight is still wanted (not dropped)."""
        return any(not run.dropped for run in self.by_ref.values())

    def __len__(self) -> int:
        return len(self.by_ref)

    def __iter__(self):
        return iter(list(self.by_ref))


class HandOut:
    def __init__(self, depth: int, backups: bool) -> None:
        self.depth = depth  # units an actor holds at once: one running, the rest read ahead
        self.backups = backups
        self._next = 0  # where the turn among equally loaded actors starts

    def slot_for_next(self, live: Sequence[bool], runs: Runs, starting: bool = False) -> int | None:
        """The live slot that takes the next unit: fewest units held, ties in turn; None if
        every live slot holds ``depth`` (:data:`STARTING_DEPTH` while others are ``starting``)."""
        n = len(live)
        depth = min(self.depth, STARTING_DEPTH) if starting else self.depth
        order = [(self._next + k) % n for k in range(n)]
        free = [i for i in order if live[i] and runs.load(i) < depth]
        if not free:
            return None
        best = min(free, key=runs.load)  # min keeps the first of equals: the turn order
        self._next = (best + 1) % n
        return best

    @staticmethod
    def idle_slots(live: Sequence[bool], runs: Runs) -> list[int]:
        return [i for i, up in enumerate(live) if up and runs.load(i) == 0]

    @staticmethod
    def to_move(runs: Runs, idle: int) -> object | None:
        """A ref of a unit on a busy slot not known to have started there, newest first: it can
        go to the idle slot ``idle`` with nothing lost (its actor refuses if it has started).
        The slot's first is a candidate too: an actor's calls can begin in any order. A slot's
        only unit stays: moving it would idle its slot instead (and it would move back)."""
        for slot, refs in enumerate(runs.by_slot):
            if slot == idle:
                continue
            live = [r for r in refs if not runs.by_ref[r].dropped]
            if len(live) < 2:
                continue
            for ref in reversed(live):
                run = runs.by_ref[ref]
                if not run.started and not run.copy and len(runs.twins(run.unit.unit_id)) == 1:
                    return ref
        return None

    def to_copy(self, runs: Runs, idle: int) -> object | None:
        """A ref whose unit gets a backup copy on ``idle``: running elsewhere, not copied yet;
        the one handed out last (the most work left). None with backups off."""
        if not self.backups:
            return None
        candidates = [
            ref
            for ref, run in runs.by_ref.items()
            if run.slot != idle
            and not run.dropped
            and len(runs.twins(run.unit.unit_id)) == 1
            and run.unit.unit_id not in runs.settled
        ]
        return max(candidates, key=lambda r: runs.by_ref[r].start_s, default=None)
