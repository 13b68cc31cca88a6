"""Liveness: an engine holding rows must keep answering, or it is declared dead.

Two watchers, neither inside an engine's own threads:

- :class:`Watchdog`, a thread in each actor: while rows are inside the engine and no result of
  any kind came out for ``limits.stall_s``, the engine is stalled. The actor then logs every
  thread's stack (where it hangs), tells the flight recorder, and exits; the driver replaces it
  and the rows that were inside run alone, as after a crash (a row that stalls every engine
  that meets it ends as ENGINE_STALL). It watches results, not batch time: a slow engine whose
  results keep coming is healthy.
- The driver reads each actor's heartbeat (sent by the same thread: rows inside, rows done in
  units not yet committed, seconds since its last result) from the recorder. An actor with work
  whose heartbeats stop for :func:`silence_limit` is wedged as a whole process (a call holding
  the interpreter, a frozen process) and is killed from outside. The same beats move the
  driver's progress line with rows finished inside running units.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from ..errors import ACTOR_ENGINE_DEAD

log = logging.getLogger(__name__)


def beat_interval(stall_s: float) -> float:
    """Seconds between an actor's heartbeats (and its watchdog's checks)."""
    return max(0.2, min(5.0, stall_s / 4))


def silence_limit(stall_s: float) -> float:
    """Seconds without a heartbeat after which the driver kills an actor that holds work: past
    the actor's own watchdog (which exits first when only the engine hangs), with room for a
    heartbeat delayed by a busy host."""
    return 2 * stall_s + 10


@dataclass
class Beat:
    """One actor's heartbeat, as the driver reads it from the recorder."""

    age_s: float  # seconds since the recorder received it
    inside: int  # rows inside the engine
    running_rows: int  # rows done in units the actor still holds (not yet returned)
    quiet_s: float  # seconds since the engine's last result while rows were inside (0: none)


def all_stacks() -> str:
    """Every thread's stack, for the log of a stalled engine: where it hangs."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, ident)}\n{stack}")
    return "\n".join(parts)


class Watchdog:
    """Watches one engine from a thread of its own: ``progress()`` on every result,
    ``entered(n)`` as rows enter; ``on_stall(inside, quiet_s)`` is called once if the engine
    holds rows and stays silent for ``stall_s``; ``beat(inside, running_rows, quiet_s)`` every
    :func:`beat_interval` seconds."""

    def __init__(
        self,
        stall_s: float,
        inside: Callable[[], int],
        running_rows: Callable[[], int],
        on_stall: Callable[[int, float], None],
        beat: Callable[[int, int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stall_s = stall_s
        self._inside, self._running_rows = inside, running_rows
        self._on_stall, self._beat = on_stall, beat
        self._clock = clock
        self._last = clock()  # last result, or the moment an empty engine got rows
        self._stop = threading.Event()
        self.stalled = False
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def progress(self) -> None:
        """A result came out of the engine."""
        self._last = self._clock()

    def entered(self, before: int) -> None:
        """Rows entered an engine that held ``before`` rows: an empty engine's clock starts."""
        if before == 0:
            self._last = self._clock()

    def quiet_s(self, inside: int) -> float:
        return self._clock() - self._last if inside else 0.0

    def check(self) -> bool:
        """One look (the thread's loop, and tests): True once the engine is declared stalled."""
        if self.stalled:
            return True
        inside = self._inside()
        quiet = self.quiet_s(inside)
        if self._beat is not None:
            try:
                self._beat(inside, self._running_rows(), quiet)
            except Exception as exc:  # a lost heartbeat only delays the driver's progress line
                log.debug("heartbeat not sent: %s", exc)
        if inside and quiet > self.stall_s:
            self.stalled = True
            self._on_stall(inside, quiet)
        return self.stalled

    def _run(self) -> None:
        interval = beat_interval(self.stall_s)
        while not self._stop.wait(interval):
            if self.check():
                return


def exit_stalled(inside: int, quiet_s: float, stall_s: float, recorder, take_left) -> NoReturn:
    """The engine holds rows and stopped answering: log where every thread is, put the rows
    really inside on record as a stall (``recorder``: the actor's RecorderClient), and exit at
    once (an engine that hangs may hang its close too)."""
    log.error(
        "engine stalled: %d rows inside, no result for %.0f s (limits.stall_s=%g); this "
        "actor exits and is replaced, its rows run alone next. Threads:\n%s",
        inside,
        quiet_s,
        stall_s,
        all_stacks(),
    )
    recorder.stalled(take_left)
    _exit()


def exit_dead(close) -> NoReturn:
    """The engine is dead: free the device if ``close`` still can (never hang on it), exit."""
    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    _exit()


def kill_descendants() -> list[int]:
    """SIGKILL every process this one started, and theirs: an engine's worker (TensorRT-LLM's
    MPI worker) would otherwise outlive the actor and keep the GPU from its replacement."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    return [proc.pid for proc in procs]


def _exit() -> NoReturn:
    killed = kill_descendants()
    if killed:
        log.error("killed this actor's child processes %s before it exits", killed)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(ACTOR_ENGINE_DEAD)
