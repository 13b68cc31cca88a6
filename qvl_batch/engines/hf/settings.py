"""The hf engine's settings (``engine.hf.*``); light: built at config validation."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check


@dataclass
class HFEngineConfig:
    """transformers engine knobs (the reference engine; CPU and GPU)."""

    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False  # never on unless the job says so: it runs model-repo code
    # Where pixels are normalised and cut into patches: "device" (torch on the engine's device,
    # from uint8 pixels) or "processor" (transformers' numpy image processor on the CPU).
    preprocess: str = "device"
    # Decode with static KV caches and a torch.compile'd decode step (CUDA graphs); one graph
    # per batch-size rung and cache length step (qvl_batch.engines.hf.decode). null (auto): on
    # for a model on one CUDA GPU with transformers >= 4.57.3, off elsewhere (CPU, a device
    # map); true: required (refused where unsupported); false: off. CUDA graphs keep the decode
    # loop's speed when the host is busy (the runner's prepare threads, other GPUs' engines):
    # docs/PERFORMANCE.md "Faster transformers engine". In flight (schedule: inflight) it
    # compiles the static slots' decode step (inflight_cache: static; refused with dynamic).
    compile: bool | None = None
    # GiB the compiled decode's static KV caches may hold (one per batch-size rung and cache
    # length met, kept for the job: qvl_batch.engines.hf.decode); a batch whose cache would pass
    # it runs eagerly. null: a quarter of the GPU memory free once the model is loaded (CPU: no
    # cap; qvl_batch.engines.hf.decode.CACHE_SHARE says why a quarter).
    static_cache_gib: float | None = None
    # At most this many (batch rung, cache length) shapes get a compiled decode (each a compile
    # of tens of seconds on a 7B, once per actor); batches of other shapes run eagerly.
    compile_shapes: int = 8
    # A shape's decode is compiled the Nth time a batch of it is met (1: at once, the warm-up's
    # included); before that its batches run eagerly. A compile took ~36 s a shape on an H100
    # with a 7B and saves ~20 s a batch of mixed photos: worth it for shapes that come back.
    compile_after: int = 2
    # The text model's attention in decode steps: "grouped" (qvl_batch.engines.hf.gqa: each KV
    # head's query heads attend as its queries, no copy of the cache per query head; the same
    # output), "stock" (transformers' SDPA: copies every KV head out to its query heads, each step,
    # when a mask is passed, which a left-padded batch always does), or "auto": grouped with the
    # compiled decode where the installed transformers' text model is the known shape (4.57.3,
    # 5.x) and runs sdpa; stock with the eager decode (where grouped measured slower).
    decode_attention: str = "auto"
    # The vision tower's attention: "dense" (qvl_batch.engines.hf.vision: a few batched calls
    # per block, the same output, 2.5x faster at B=128 on an H200), "stock" (transformers' own:
    # one call per window and image), or "auto": dense where the installed transformers' vision
    # attention is the shape it was written for (4.57.3, 5.x), else stock with a warning.
    vision: str = "auto"
    # How rows are scheduled: "lockstep" (batches through the batching adapter, each decoding
    # until its longest answer ends) or "inflight" (qvl_batch.engines.hf.inflight: a stream
    # engine with ``slots`` decode slots; a row leaves as it ends, a waiting row takes its
    # slot; issue #27, docs/INFLIGHT.md: on an H100 with static slots, captions of mixed
    # photos 2.47x lock-step, of 448x448 images 1.54x, fixed 64-token answers 0.96x).
    schedule: str = "lockstep"
    # inflight: rows decoding at once (0: batching.max_batch_size).
    slots: int = 0
    # inflight: the running batch's KV cache. "dynamic": one transformers DynamicCache, rows
    # concatenated as they join and compacted as they leave (eager decode). "static"
    # (qvl_batch.engines.hf.slots): slots x length allocated once a length (inflight_tokens,
    # within static_cache_gib), a row keeps its slot for life: every decode step of a length
    # has the same shapes, compiled with ``compile`` (true; null: on one CUDA GPU). "auto":
    # static where the decode compiles (every in-flight figure in docs/INFLIGHT.md), else
    # dynamic (CPU, compile: false, a text model with sliding-window layers).
    inflight_cache: str = "auto"
    # inflight_cache: static: the slots' length in tokens (rounded up to the grid); 0: grown
    # to the rows' length as they come (prompt + vision + answer tokens; each new length a new
    # compile of the step). Every step attends all of it: a length near what rows use reads
    # less. A group that does not fit grows the slots (a set length warns); past
    # static_cache_gib it decodes by itself while the slots wait. Answers are the same either way.
    inflight_tokens: int = 0

    def __post_init__(self) -> None:
        modes = ("device", "processor")
        check(self.preprocess in modes, "engine.hf.preprocess", f"must be one of {modes}")
        visions = ("auto", "dense", "stock")
        check(self.vision in visions, "engine.hf.vision", f"must be one of {visions}")
        attentions = ("auto", "grouped", "stock")
        check(
            self.decode_attention in attentions,
            "engine.hf.decode_attention",
            f"must be one of {attentions}",
        )
        schedules = ("lockstep", "inflight")
        check(self.schedule in schedules, "engine.hf.schedule", f"must be one of {schedules}")
        check(self.slots >= 0, "engine.hf.slots", "must be >= 0 (0: batching.max_batch_size)")
        caches = ("auto", "dynamic", "static")
        check(self.inflight_cache in caches, "engine.hf.inflight_cache", f"must be one of {caches}")
        check(self.inflight_tokens >= 0, "engine.hf.inflight_tokens", "must be >= 0 (0: the rows')")
        check(self.compile_shapes >= 1, "engine.hf.compile_shapes", "must be >= 1")
        check(self.compile_after >= 1, "engine.hf.compile_after", "must be >= 1")
        check(
            self.static_cache_gib is None or self.static_cache_gib >= 0,
            "engine.hf.static_cache_gib",
            "must be >= 0 GiB, or null (a quarter of the GPU memory free once the model is loaded)",
        )
