"""One thread for every model call of an hf engine (warm-up, compiles, batches).

CUDA graph trees before torch 2.13 keep their state in the thread that recorded the first graph;
recording one from any other thread raises a bare ``AssertionError`` in
``torch._inductor.cudagraph_trees.get_obj`` (pytorch/pytorch#123177, fixed by #184357). The
actor warms the engine up on its own thread and the batching adapter runs batches on another,
so every new decode shape failed on the GPU (docs/PERFORMANCE.md "H100 call, session 12").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class ModelThread:
    """Runs callables on one daemon thread, in order; the caller waits for each result.
    A daemon: a wedged engine must not hold the process (the watchdog ``os._exit``s it)."""

    def __init__(self, name: str = "hf-model"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.get_ident() == self._thread.ident:  # nested: already on it
            return fn(*args)
        if not self._thread.is_alive():
            raise RuntimeError("the hf engine's model thread has stopped (engine closed)")
        done: Future = Future()
        self._jobs.put((fn, args, done))
        return done.result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # the caller's to handle, as if called inline
                done.set_exception(exc)
