"""Build the engine a job names: its module from the registry, imported now; a lock-step
engine wrapped in the batching adapter so the actor always sees a stream."""

from __future__ import annotations

import importlib

from ..config import Config
from . import REGISTRY
from .base import BatchEngine, Engine
from .batching import BatchingAdapter


def _built(cfg: Config, incarnation: int) -> Engine | BatchEngine:
    entry = REGISTRY.get(cfg.engine.name)
    if entry is None:
        raise ValueError(f"unknown engine {cfg.engine.name!r}")
    factory = getattr(importlib.import_module(entry.module), entry.factory)
    return factory(cfg, incarnation)


def make_batch_engine(cfg: Config, incarnation: int = 0) -> BatchEngine:
    """The lock-step engine the job names (hf, fake): what benchmarks time bare."""
    engine = _built(cfg, incarnation)
    if not isinstance(engine, BatchEngine):
        engine.close()
        raise ValueError(f"engine {cfg.engine.name!r} is not a lock-step engine")
    return engine


def make_engine(cfg: Config, incarnation: int = 0) -> Engine:
    """The configured engine as a stream. ``incarnation`` counts actor replacements."""
    engine = _built(cfg, incarnation)
    return BatchingAdapter(engine, cfg) if isinstance(engine, BatchEngine) else engine
