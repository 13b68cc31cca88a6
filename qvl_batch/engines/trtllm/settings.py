"""The trtllm engine's settings (``engine.trtllm.*``); light: built at config validation."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check


@dataclass
class TrtLlmEngineConfig:
    """TensorRT-LLM LLM API (PyTorch backend) knobs; anything else goes in engine.options."""

    tensor_parallel_size: int = 1
    max_batch_size: int = 64
    max_num_tokens: int = 16384
    max_seq_len: int = 8192
    kv_cache_free_gpu_memory_fraction: float = 0.85
    # Off by default: upstream reports wrong outputs with KV block reuse on for several VLMs.
    enable_block_reuse: bool = False
    cuda_graphs: bool = True
    # Requests the actor keeps inside the engine; 0 = 2 x max_batch_size. TensorRT-LLM batches
    # in flight: a finished sequence's slot is refilled at once, but only from requests already
    # waiting in its scheduler. Twice the batch keeps a full batch waiting behind the running
    # one (its prefill and vision encoding overlap the decode), without flooding the queue.
    max_inflight_requests: int = 0
    # Seconds one request may take before it is aborted and tried once more (then an
    # ENGINE_TIMEOUT row): a request that never completes must not hang the actor.
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check(self.tensor_parallel_size >= 1, "engine.trtllm.tensor_parallel_size", ">= 1")
        check(
            0 < self.kv_cache_free_gpu_memory_fraction <= 1,
            "engine.trtllm.kv_cache_free_gpu_memory_fraction",
            "must be in (0, 1]",
        )
        check(self.max_inflight_requests >= 0, "engine.trtllm.max_inflight_requests", ">= 0")
        check(self.request_timeout_s > 0, "engine.trtllm.request_timeout_s", "must be > 0")
