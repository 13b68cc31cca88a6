"""What the engine hands TensorRT-LLM's LLM API: the import, ``LLM(...)`` and ``SamplingParams``."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from ...config import Config
from .. import settings_of

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "engine 'trtllm' needs TensorRT-LLM: run in NVIDIA's TensorRT-LLM release container "
    "(nvcr.io/nvidia/tensorrt-llm/release), or `pip install tensorrt_llm` on a Linux machine "
    "with CUDA (Python 3.10 or 3.12). `qvl-batch doctor` shows what is missing."
)


def import_trtllm() -> ModuleType:
    """Import tensorrt_llm (and its llmapi submodule) or raise ImportError with an install hint."""
    try:
        import tensorrt_llm
        import tensorrt_llm.llmapi  # KvCacheConfig and CudaGraphConfig are exported here
    except ImportError as exc:
        if exc.name == "tensorrt_llm":
            raise ImportError(f"tensorrt_llm is not installed. {INSTALL_HINT}") from exc
        raise ImportError(f"tensorrt_llm failed to import ({exc}). {INSTALL_HINT}") from exc
    return tensorrt_llm


def llm_kwargs(cfg: Config, api: ModuleType) -> dict[str, Any]:
    """Keyword arguments of ``api.LLM(...)`` for this job; ``engine.options`` overrides them.

    KV block reuse is off unless the job turns it on (upstream reports wrong outputs with it on
    for several VLMs); CUDA graphs, when on, are padded up to the engine's max batch size; a job
    with a JSON schema to guide answers gets the xgrammar guided-decoding backend.
    """
    t = settings_of(cfg, "trtllm")
    kv_cache = api.llmapi.KvCacheConfig(
        free_gpu_memory_fraction=t.kv_cache_free_gpu_memory_fraction,
        enable_block_reuse=t.enable_block_reuse,
    )
    cuda_graphs = None
    if t.cuda_graphs:
        cuda_graphs = api.llmapi.CudaGraphConfig(
            max_batch_size=t.max_batch_size, enable_padding=True
        )
    kwargs: dict[str, Any] = {
        "model": cfg.engine.model,
        # The default of tensorrt_llm.LLM since 1.0; explicit so an older wheel cannot silently
        # pick the TensorRT engine-build path.
        "backend": "pytorch",
        "tensor_parallel_size": t.tensor_parallel_size,
        "max_batch_size": t.max_batch_size,
        "max_num_tokens": t.max_num_tokens,
        "max_seq_len": t.max_seq_len,
        "dtype": cfg.engine.dtype,
        "kv_cache_config": kv_cache,
        "cuda_graph_config": cuda_graphs,
        # The model's own code stays off unless engine.options says so; TensorRT-LLM's input
        # processor loads the HF processor with trust_remote_code=True whatever this says
        # (inputs/registry.py), harmless for stock Qwen2.5-VL, which ships no code.
        "trust_remote_code": False,
    }
    # Versions that check prompts against max_input_len (default 1024) must not refuse a long
    # vision prompt (up to 1280 image tokens plus text) that max_seq_len allows.
    kwargs["max_input_len"] = t.max_seq_len
    if guided_schema(cfg) is not None:
        # Without a backend the executor refuses requests that carry GuidedDecodingParams.
        kwargs["guided_decoding_backend"] = "xgrammar"
    if cfg.sampling.repetition_penalty != 1.0 and penalties_need_trtllm_sampler():
        kwargs["sampler_type"] = "TRTLLMSampler"
    kwargs.update(cfg.engine.options)
    return kwargs


def penalties_need_trtllm_sampler() -> bool:
    """True where the LLM args still offer ``sampler_type``: there (1.2.x) the default
    TorchSampler accepts repetition_penalty and ignores it (upstream issue #9442) and the
    TRTLLMSampler applies it; the option went (PR #18232) after the TorchSampler learned
    penalties (PR #16485). Told by the field, not the version: 1.3 release candidates differ."""
    try:
        args = importlib.import_module("tensorrt_llm.llmapi.llm_args").TorchLlmArgs
        fields = args.model_fields
    except (ImportError, AttributeError) as exc:
        log.warning("cannot tell whether TensorRT-LLM offers sampler_type (%s); not passed", exc)
        return False
    return "sampler_type" in fields


def guided_schema(cfg: Config) -> dict[str, Any] | None:
    """The JSON schema answers are constrained to; None without one or with guided=off."""
    structured = cfg.structured
    if structured.json_schema is None or structured.guided == "off":
        return None
    return structured.json_schema


def sampling_kwargs(cfg: Config, stop_ids: list[int] | None = None) -> dict[str, Any]:
    """Keyword arguments of ``SamplingParams(...)``: max_tokens always (its default is 32).

    Greedy (temperature 0) is sent as top_k=1 with temperature and top_p unset, which every
    1.x version treats as greedy. A neutral repetition penalty is left unset, which keeps the
    runtime on its default path. ``stop_ids``: the model's EOS ids, each a stop token.
    """
    s = cfg.sampling
    greedy = s.temperature == 0
    kwargs = {
        "max_tokens": s.max_tokens,
        "temperature": None if greedy else s.temperature,
        "top_p": None if greedy else s.top_p,
        "top_k": 1 if greedy else (s.top_k or None),
        "repetition_penalty": None if s.repetition_penalty == 1.0 else s.repetition_penalty,
        "seed": s.seed,
    }
    if stop_ids:
        kwargs["stop_token_ids"] = list(stop_ids)
    return kwargs
