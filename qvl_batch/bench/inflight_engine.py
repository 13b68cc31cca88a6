"""The hf in-flight engine around the bench's already loaded lock-step engine.

``HFInflightEngine`` wraps an ``HFEngine`` and closes it with itself: right for a job, where
one engine owns its model. The bare section loads the model once (~1 min for a 7B on a GPU)
and times lock-step batches and in-flight streams of several slot counts on it, so the
wrapper it builds per run stops its scheduler and leaves the model to the section.
Imported only when a bare section runs in flight (it imports torch).
"""

from __future__ import annotations

import copy

from ..config import Config
from ..engines import settings_of
from ..engines.hf.inflight import HFInflightEngine


class BorrowedInflight(HFInflightEngine):
    """An in-flight engine on a model it does not own: ``close`` leaves the model loaded, its
    lock-step engine's decode as it was lent (building this one switches ``generate``'s
    compiled decode off)."""

    def __init__(self, hf, cfg: Config):
        self._lent_compiled = hf.compiled
        super().__init__(hf, cfg)

    def close(self) -> None:
        self._stop()
        if self._lent_compiled and not self.hf.compiled:
            self.hf.set_modes(compile=True)


def inflight_on(hf, cfg: Config, slots: int) -> BorrowedInflight:
    """The in-flight schedule with ``slots`` decode slots on ``hf``'s loaded model (its current
    modes: vision, decode attention, answer lengths, and its decode: the compiled variant
    compiles the static slots' step, unless ``engine.hf.inflight_cache=dynamic``)."""
    cfg = copy.deepcopy(cfg)
    settings = settings_of(cfg, "hf")
    settings.schedule, settings.slots = "inflight", slots
    # the dynamic cache's decode is eager (a lock-step variant may compile)
    settings.compile = hf.compiled if settings.inflight_cache != "dynamic" else False
    return BorrowedInflight(hf, cfg)
