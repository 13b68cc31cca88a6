"""The bare benchmark warms an engine up as an actor does (``engine.warmup``): a real batch as
the warm-up made the hf engine's first timed batch its shape's second meeting, so the compile
(100 s on an H100) fell inside the clock (session 13)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qvl_batch.bench.engine import time_batches
from qvl_batch.engines.build import make_batch_engine

from ..engine_inputs import engine_requests, small_engine_config

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(300)


def test_no_compile_inside_the_timed_batches(tiny_model):
    engine = make_batch_engine(small_engine_config(tiny_model, compile=True))  # compile_after 2
    try:
        run = time_batches(engine, engine_requests(8), 4, 0)
        assert run["rows"] == 8 and run["errors"] == 0
        assert run["engine_s_per_batch"]["compile"] == 0
        assert engine.caches.shapes()  # the warm-up's own shape did compile
    finally:
        engine.close()
