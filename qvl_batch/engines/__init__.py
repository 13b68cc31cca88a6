"""The engines by name: the one list that config validates against, that the cluster asks how
many GPUs an engine spans, and that :mod:`qvl_batch.engines.build` builds from.

Light on purpose (no project or heavy imports): each engine's module is named here as a string
and imported only when that engine is built, so neither this registry nor the engine seam
imports a concrete engine, and none imports back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineEntry:
    name: str
    module: str  # imported only when the engine is built
    factory: str  # in ``module``: (cfg, incarnation) -> an Engine (stream) or a BatchEngine
    what: str
    # GPUs one engine spans on one node beyond cluster.num_gpus_per_actor (tensor parallel)
    spans_gpus: Callable[[Any], int] | None = None


REGISTRY: dict[str, EngineEntry] = {
    e.name: e
    for e in (
        EngineEntry(
            "fake",
            "qvl_batch.engines.fake",
            "make_fake_engine",
            "deterministic stand-in: latency model, in-flight simulator, fault injection",
        ),
        EngineEntry(
            "hf",
            "qvl_batch.engines.hf.engine",
            "make_hf_engine",
            "transformers, lock-step batches through the batching adapter",
        ),
        EngineEntry(
            "trtllm",
            "qvl_batch.engines.trtllm",
            "make_trtllm_engine",
            "TensorRT-LLM LLM API, fed as a stream",
            spans_gpus=lambda cfg: cfg.engine.trtllm.tensor_parallel_size,
        ),
    )
}
ENGINES = tuple(REGISTRY)


def gpus_spanned(cfg: Any) -> int:
    """GPUs one engine of ``cfg`` needs on one node (1 unless the engine is tensor parallel)."""
    entry = REGISTRY.get(cfg.engine.name)
    return entry.spans_gpus(cfg) if entry and entry.spans_gpus else 1
