"""The registry's builder of the hf engine (light: the engine modules are imported when it runs)."""

from __future__ import annotations

from typing import Any

from ...config import Config
from .. import settings_of


def make_hf_engine(cfg: Config, incarnation: int = 0) -> Any:
    """The lock-step :class:`~.engine.HFEngine` (a model load does not depend on the
    incarnation), or with ``engine.hf.schedule: inflight`` the stream engine around it
    (:mod:`.inflight`)."""
    if settings_of(cfg, "hf").schedule == "inflight":
        from .inflight import make_inflight_engine

        return make_inflight_engine(cfg)
    from .engine import HFEngine

    return HFEngine(cfg)
