"""One unit's results in an actor, gathered as its rows come back (any order, any thread)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..engines.base import Result


@dataclass
class UnitCollector:
    """Results of one unit's rows as they come back, in input order."""

    results: list[Result | None]
    meta: list[dict | None]
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    entered: int = 0  # rows handed to the engine so far
    started: int = 0  # ...of those, rows the engine started computing (its entering note)
    answered: int = 0  # rows with a result
    inside: int = 0  # rows inside the engine now
    withdrawn: bool = False  # the driver took the unit back: its call returns None
    unsent: int = 0  # good rows not yet handed to the prepare pool

    def put(self, index: int, result: Result) -> None:
        if self.results[index] is not None:
            raise RuntimeError(f"row {index} answered twice")
        self.results[index] = result
        self.remaining -= 1
        self.answered += 1
        if self.remaining == 0:
            self.done.set()
