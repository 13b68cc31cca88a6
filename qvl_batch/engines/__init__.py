"""The engines by name: the one list that config validates against, that the cluster asks how
many GPUs an engine spans, and that :mod:`qvl_batch.engines.build` builds from. Each engine
owns its settings (``engine.<name>.*``): a dataclass in a light module, named here.

Light on purpose (no heavy imports; of the project only errors): each engine's module is named
here as a string and imported only when that engine is built (its settings' module when a job
is validated), so neither this registry nor the engine seam imports a concrete engine.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class EngineEntry:
    name: str
    module: str  # imported only when the engine is built
    factory: str  # in ``module``: (cfg, incarnation) -> an Engine (stream) or a BatchEngine
    what: str
    settings: str  # "module:Class", the dataclass of ``engine.<name>.*`` (a light module)
    # GPUs one engine spans on one node beyond cluster.num_gpus_per_actor (tensor parallel)
    spans_gpus: Callable[[Any], int] | None = None
    # "module:function" (a light module): (cfg) -> None, a ConfigError for settings this
    # engine cannot run with, checked with the job before any work
    job_check: str | None = None
    # Top-level packages the engine imports (looked up, never imported, by the driver's
    # pre-flight) and how to get them
    packages: tuple[str, ...] = ()
    install_hint: str = ""


REGISTRY: dict[str, EngineEntry] = {
    e.name: e
    for e in (
        EngineEntry(
            "fake",
            "qvl_batch.engines.fake",
            "make_fake_engine",
            "deterministic stand-in: latency model, in-flight simulator, fault injection",
            "qvl_batch.engines.fake:FakeEngineConfig",
        ),
        EngineEntry(
            "hf",
            "qvl_batch.engines.hf.build",
            "make_hf_engine",
            "transformers: lock-step batches through the batching adapter, or in flight (a stream)",
            "qvl_batch.engines.hf.settings:HFEngineConfig",
            packages=("torch", "transformers"),
            install_hint="pip install 'qvl-batch[hf]' (torch + transformers)",
        ),
        EngineEntry(
            "trtllm",
            "qvl_batch.engines.trtllm.engine",
            "make_trtllm_engine",
            "TensorRT-LLM LLM API, fed as a stream",
            "qvl_batch.engines.trtllm.settings:TrtLlmEngineConfig",
            spans_gpus=lambda cfg: settings_of(cfg, "trtllm").tensor_parallel_size,
            job_check="qvl_batch.engines.trtllm.prompts:check_image_bounds",
            packages=("tensorrt_llm",),
            install_hint="run in NVIDIA's TensorRT-LLM release container "
            "(nvcr.io/nvidia/tensorrt-llm/release), or `pip install tensorrt_llm` on a Linux "
            "machine with CUDA (Python 3.10 or 3.12); `qvl-batch doctor` shows what is missing",
        ),
    )
}
ENGINES = tuple(REGISTRY)


def gpus_spanned(cfg: Any) -> int:
    """GPUs one engine of ``cfg`` needs on one node (1 unless the engine is tensor parallel)."""
    entry = REGISTRY.get(cfg.engine.name)
    return entry.spans_gpus(cfg) if entry and entry.spans_gpus else 1


def check_job(cfg: Any) -> None:
    """The chosen engine's own check of the job's settings (a ConfigError), if it has one."""
    entry = REGISTRY[cfg.engine.name]
    if entry.job_check:
        module, _, func = entry.job_check.partition(":")
        getattr(importlib.import_module(module), func)(cfg)


def settings_class(name: str) -> type:
    module, _, cls = REGISTRY[name].settings.partition(":")
    return getattr(importlib.import_module(module), cls)


def settings_of(cfg: Any, name: str) -> Any:
    """``cfg.engine.<name>`` as its engine's settings dataclass (built from the mapping a loaded
    config holds, once, with a ConfigError naming a key it does not know)."""
    section = getattr(cfg.engine, name)
    cls = settings_class(name)
    if isinstance(section, cls):
        return section
    values = dict(section or {})
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - known):
        raise ConfigError(
            f"engine.{name}: unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}"
        )
    built = cls(**values)
    setattr(cfg.engine, name, built)
    return built
