"""Stage clocks of one hf ``generate`` call: vision tower, prefill, decode (CUDA events on a GPU,
no host sync in the decode loop)."""

from __future__ import annotations

import time
from typing import Any

import torch
import transformers


class StageClock:
    """Splits one ``generate`` call into vision tower, prefill and decode seconds.

    Marks: ``start`` (before ``generate``), the vision tower's forward entry and exit (hooks),
    the first logits (:class:`FirstLogits`, the prefill's end) and ``end`` (``generate`` has
    returned). On CUDA a mark is a ``torch.cuda.Event`` recorded on the current stream, so the
    decode loop gets no host sync; the events are read in :meth:`split`, after the outputs were
    copied to the host (which waits for the GPU anyway). On CPU marks are ``time.perf_counter``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] | None = None  # None: not inside a timed generate
        self.vision: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.vision = []
        self.marks = {"start": self._mark()}

    def vision_enter(self, *_: Any) -> None:
        if self.marks is not None:
            self.vision.append((self._mark(), None))

    def vision_exit(self, *_: Any) -> None:
        if self.marks is not None and self.vision and self.vision[-1][1] is None:
            self.vision[-1] = (self.vision[-1][0], self._mark())

    def first_logits(self) -> None:
        if self.marks is not None and "first" not in self.marks:
            self.marks["first"] = self._mark()

    def stop(self) -> None:
        if self.marks is not None:
            self.marks["end"] = self._mark()

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def split(self) -> dict[str, float]:
        """``vision``, ``prefill`` (vision included) and ``decode`` seconds of the call."""
        marks, self.marks = self.marks or {}, None
        if "start" not in marks or "end" not in marks:
            return {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        if self.cuda:
            marks["end"].synchronize()
        first = marks.get("first", marks["end"])
        vision = sum(self._seconds(a, b) for a, b in self.vision if b is not None)
        return {
            "vision": vision,
            "prefill": self._seconds(marks["start"], first),
            "decode": self._seconds(first, marks["end"]),
        }


class FirstLogits(transformers.LogitsProcessor):
    """Leaves the scores as they are; its first call marks the prefill's end on the clock, and
    every call (one per step) is a sign of life for the actor's watchdog."""

    def __init__(self, clock: StageClock, alive):
        self.clock, self.alive = clock, alive

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.clock.first_logits()
        self.alive()
        return scores
