"""The flight recorder: which rows are inside each actor's engine, kept outside the actors, so a
process death is blamed on the rows that were really inside (``isolation.py`` judges them).
:class:`FlightRecorder` is the driver's one Ray actor; :class:`RecorderClient` an actor's line
to it. It also carries the actors' own warnings and errors to the driver (:class:`RelayHandler`)
while Ray's log forwarding is off (``cluster.ray_logs``)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .liveness import Beat

log = logging.getLogger(__name__)

# The recorder answers in milliseconds; a stuck one must not hold the engine for long.
RECORD_TIMEOUT_S = 30
# Actor messages held for the driver, which takes them every heartbeat interval (seconds); a
# flood beyond this between two reads loses its oldest lines, never blocks an actor.
RELAY_KEEP = 1000
RELAY_WAIT_S = 5  # an error may be an actor's last word before it exits: it is waited for


class FlightRecorder:
    """What each actor has inside its engine right now, kept outside the actors.

    A worker notes rows as they enter its engine (in groups, waiting for the note) and the
    rows that came back since its last note (no wait of their own). When an actor process
    dies, the driver reads what it had inside: those are the rows that may have killed it.
    Workers also send heartbeats here (``liveness.py``), and a worker whose engine stalled says
    so before it exits, so its rows are judged as stalls, not crashes.
    One plain (single-threaded) Ray actor, so notes from one worker are applied in the order
    they were sent.
    """

    def __init__(self) -> None:
        self._inside: dict[int, set] = {}
        self._stalled: set[int] = set()
        self._beats: dict[int, tuple[float, int, int, float]] = {}
        self._said: deque[tuple[int, int, str]] = deque(maxlen=RELAY_KEEP)

    def said(self, incarnation: int, level: int, text: str) -> None:
        """An actor logged a warning or an error (RelayHandler)."""
        self._said.append((incarnation, level, text))

    def news(self) -> list[tuple[int, int, str]]:
        """(incarnation, level, text) the actors said since the last call, oldest first."""
        out = list(self._said)
        self._said.clear()
        return out

    def note(self, incarnation: int, entering: list, left: list) -> None:
        inside = self._inside.setdefault(incarnation, set())
        inside.difference_update(tuple(k) for k in left)
        inside.update(tuple(k) for k in entering)
        if not inside:
            del self._inside[incarnation]

    def stalled(self, incarnation: int) -> None:
        """The incarnation's engine stalled (its watchdog, or the driver, declared it dead)."""
        self._stalled.add(incarnation)

    def beat(self, incarnation: int, inside: int, running_rows: int, quiet_s: float) -> None:
        self._beats[incarnation] = (time.monotonic(), inside, running_rows, quiet_s)

    def health(self, incarnations: list[int]) -> dict[int, Beat]:
        """The last heartbeat of each of ``incarnations`` that sent one."""
        now = time.monotonic()
        return {i: Beat(now - b[0], *b[1:]) for i in incarnations if (b := self._beats.get(i))}

    def last(self, incarnation: int) -> tuple[list | None, bool]:
        """(what the incarnation had inside at its death, whether it stalled); forgets it."""
        inside = self._inside.pop(incarnation, None)
        self._beats.pop(incarnation, None)
        stalled = incarnation in self._stalled
        self._stalled.discard(incarnation)
        return (sorted(inside) if inside else None), stalled


class RecorderClient:
    """An actor's notes to the driver's recorder, in the order sent (``recorder`` None: no
    recorder, every call does nothing). Entering rows are waited for: they must be on record
    before a crash can happen; leaving rows ride along with the next note. If the recorder
    cannot be reached only crash isolation is lost for those rows, never the rows."""

    def __init__(self, recorder, incarnation: int):
        self.recorder, self.incarnation = recorder, incarnation
        self._lock = threading.Lock()  # notes reach the recorder in the order sent

    def warm(self) -> None:
        """A first note ("nothing inside"), waited for: the connection is set up before work."""
        self.note([], lambda: [], wait=True)

    def note(self, entering: list, take_left: Callable[[], list], wait: bool = False) -> None:
        """``entering`` rows and the rows ``take_left()`` returns (called under this client's
        lock, so rows leave in the order they were noted)."""
        with self._lock:
            left = take_left()
            if self.recorder is None or not (entering or left or wait):
                return
            try:
                ref = self.recorder.note.remote(self.incarnation, entering, left)
                if entering or wait:
                    import ray

                    ray.get(ref, timeout=RECORD_TIMEOUT_S)
            except Exception as exc:
                log.warning("flight recorder unavailable: %s: %s", type(exc).__name__, exc)

    def beat(self, inside: int, running_rows: int, quiet_s: float) -> None:
        self.recorder.beat.remote(self.incarnation, inside, running_rows, quiet_s)

    def stalled(self, take_left: Callable[[], list]) -> None:
        """On record: the engine stalled (its rows are judged as a stall, not a crash)."""
        if self.recorder is None:
            return
        import ray

        try:
            with self._lock:
                self.recorder.note.remote(self.incarnation, [], take_left())
                ray.get(self.recorder.stalled.remote(self.incarnation), timeout=RECORD_TIMEOUT_S)
        except Exception as exc:  # its rows then count as a crash's
            log.warning("flight recorder unavailable: %s: %s", type(exc).__name__, exc)


class RelayHandler(logging.Handler):
    """An actor's own warnings and errors (the ``qvl_batch`` loggers: the runner's and the
    engines') sent to the recorder, from which the driver logs them as its own lines. With Ray's
    forwarding of worker output off, this is how a stall or an engine's death still reaches the
    user. One line each: a thread dump's rest stays in the actor's log (``-v`` forwards it)."""

    def __init__(self, recorder, incarnation: int):
        super().__init__(logging.WARNING)
        self.recorder, self.incarnation = recorder, incarnation
        self._inside = threading.local()  # a failing send logs too: never relay that

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._inside, "on", False):
            return
        self._inside.on = True
        try:
            lines = record.getMessage().splitlines() or [""]
            text = lines[0]
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f": {type(exc).__name__}: {exc}"
            if len(lines) > 1:
                text += f" [{len(lines) - 1} more lines in the actor's log; -v shows them]"
            ref = self.recorder.said.remote(self.incarnation, record.levelno, text)
            if record.levelno >= logging.ERROR:
                import ray

                ray.wait([ref], timeout=RELAY_WAIT_S)
        except Exception:
            pass
        finally:
            self._inside.on = False


def relay_logs(recorder, incarnation: int) -> None:
    """Send this process's qvl_batch warnings and errors to ``recorder`` (once per process)."""
    logger = logging.getLogger("qvl_batch")
    for old in [h for h in logger.handlers if isinstance(h, RelayHandler)]:
        logger.removeHandler(old)
    if recorder is not None:
        logger.addHandler(RelayHandler(recorder, incarnation))
