"""The hf engine's compiled decode (``engine.hf.compile``): its shapes and static KV caches.

The decode step runs through transformers' own ``torch.compile`` (CUDA graphs on GPU) on static
caches the engine owns (reset per batch, never reallocated: a graph holds its cache's addresses).
Shapes come in steps: batch rungs ``B, B/2, B/4, B/8`` (a batch padded up with dummy rows of one
token) and cache lengths on a grid of two steps per octave (128, 192, 256, 384, ...). The step is
compiled with dynamic shapes, but the first compile is specialised to its rung (the static cache's
batch dimension); a second rung recompiles it dynamic, and that graph serves every later rung and
length (a new shape is only a graph capture): at most two compiles a process.
A shape is compiled the ``engine.hf.compile_after``-th time a batch of it is met (its first
batches run eagerly: a compile costs ~36 s on a 7B, a mixed-size job meets many shapes once), the
warm-up's at once (the warm-up is where one-time costs belong; a job of one image size runs
nothing but its shape), made
before its batch and timed (``compile``); at most ``engine.hf.compile_shapes`` of them, their
caches within ``engine.hf.static_cache_gib``, accounted before they are taken; a batch past
either bound, or of a shape whose compile failed, runs eagerly with the same output. Measured:
docs/PERFORMANCE.md ("Never stuck").
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_STEP = 128  # the smallest static cache length; the grid is 128 and 192 x powers of two
# Oldest transformers the compiled decode was checked on (static cache + compiled decode step
# with Qwen2.5-VL, greedy output equal to eager): 4.57.3 and 5.x.
COMPILE_MIN_TRANSFORMERS = "4.57.3"
COMPILE_RUNGS = 4  # batch-size rungs of the compiled decode: B, B/2, B/4, B/8 (rounded up)
# By default the static caches may take this share of the GPU memory free once the model is
# loaded; the rest is the prefill's and the vision tower's working memory, eager batches' caches
# and the CUDA graphs' pools. Half (31.6 GiB on an H100 with a 7B) left too little: the eager
# decode of the same photos job alone peaked at 73.2 of 79.6 GiB (session 12).
CACHE_SHARE = 0.25


def compile_supported(gpus: int, version: str | None = None) -> bool:
    """Would ``engine.hf.compile=true`` be accepted here (``engine.hf.compile: null``)."""
    try:
        check_compile_supported(version or _installed_transformers(), gpus)
    except ValueError:
        return False
    return True


def check_compile_supported(version: str, gpus: int) -> None:
    """Refuse ``engine.hf.compile`` where it was not checked: older transformers, or a model
    split over several GPUs (a device map)."""
    from packaging.version import Version  # a transformers dependency

    if Version(version) < Version(COMPILE_MIN_TRANSFORMERS):
        raise ValueError(
            f"engine.hf.compile: transformers {version} is older than "
            f"{COMPILE_MIN_TRANSFORMERS}, the oldest "
            "whose static cache and compiled decode were checked with Qwen2.5-VL; set "
            "engine.hf.compile=false or upgrade transformers"
        )
    if gpus > 1:
        raise ValueError(
            f"engine.hf.compile: not supported with the model split over {gpus} GPUs (device "
            "map); set engine.hf.compile=false or give the actor one GPU"
        )


def _installed_transformers() -> str:
    import transformers

    return transformers.__version__


def batch_rungs(max_batch_size: int) -> list[int]:
    """The batch sizes the compiled decode runs at (ascending): a batch is padded up to the
    next rung with dummy rows, so a job compiles at most :data:`COMPILE_RUNGS` decode graphs
    per cache length."""
    return sorted({-(-max_batch_size // 2**k) for k in range(COMPILE_RUNGS)})


def grid_length(tokens: int) -> int:
    """The smallest cache length on the grid that holds ``tokens``: :data:`CACHE_STEP` or 1.5 x
    it, times a power of two (the lock-step static caches and the in-flight slots alike)."""
    length = CACHE_STEP
    while length < tokens:
        length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
    return length


def static_cache_len(tokens: int, max_positions: int) -> int:
    """The static cache length for a batch needing ``tokens`` (prompt width + longest answer):
    its :func:`grid_length`, at most the model's positions."""
    return min(grid_length(tokens), max_positions)


def kv_dims(text_config: Any) -> tuple[int, int, int]:
    """Layers, key/value heads and head size of this text model's KV cache."""
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    return (
        int(text_config.num_hidden_layers),
        int(text_config.num_key_value_heads),
        int(head_dim),
    )


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes one token takes in a KV cache of this text model: keys and values, every layer."""
    layers, heads, head_dim = kv_dims(text_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * heads * head_dim * itemsize


def default_cap(device: torch.device) -> int | None:
    """``engine.hf.static_cache_gib: null``: :data:`CACHE_SHARE` of the memory free on this CUDA
    device now (the model loaded; what PyTorch holds unused counts as free); None (no cap)
    elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CACHE_SHARE * (free + unused))


class StaticCaches:
    """The engine's static caches by (rung, length), within a cap on the bytes they hold.

    ``fits`` says whether a batch of a shape runs compiled: its cache exists or has room under
    the cap (else it runs eagerly, warned once per shape); ``get`` returns the shape's cache,
    made when first asked for. Caches are kept for the engine's life: a compiled graph is
    specialised to its cache's addresses."""

    def __init__(
        self,
        text_config: Any,
        dtype: torch.dtype,
        cap_bytes: int | None,
        max_shapes: int = 8,
        compile_after: int = 1,
    ):
        self.text_config = text_config
        self.per_token = kv_bytes_per_token(text_config, dtype)
        self.cap_bytes = cap_bytes
        self.max_shapes = max_shapes
        self.compile_after = compile_after
        self.seen: dict[tuple[int, int], int] = {}  # batches met per shape without a cache
        self.by_shape: dict[tuple[int, int], Any] = {}
        self._refused: set[tuple[int, int]] = set()
        self.failed: set[tuple[int, int]] = set()  # shapes whose compile raised: eager for good
        self.eager_batches = 0  # batches run eagerly because their cache would pass the cap

    def shapes(self) -> list[tuple[int, int]]:
        return sorted(self.by_shape)

    def bytes_of(self, rung: int, length: int) -> int:
        return rung * length * self.per_token

    @property
    def held_bytes(self) -> int:
        return sum(self.bytes_of(*shape) for shape in self.by_shape)

    def fits(self, rung: int, length: int, now: bool = False) -> bool:
        """Has the shape a cache, or room for one: met ``compile_after`` times (``now``: at once,
        the warm-up's), its compile never failed, fewer than ``max_shapes`` held and its bytes
        under the cap. Warns once for a shape refused past a bound (counted in
        ``eager_batches`` each time)."""
        shape = (rung, length)
        if shape in self.by_shape:
            return True
        self.seen[shape] = self.seen.get(shape, 0) + (self.compile_after if now else 1)
        if self.seen[shape] < self.compile_after:
            return False  # not met often enough yet to pay for its compile
        if shape in self.failed:
            why = "its compile failed"
        elif len(self.by_shape) >= self.max_shapes:
            why = (
                f"the compiled decode holds its {self.max_shapes} shapes (engine.hf.compile_shapes)"
            )
        elif self.cap_bytes is None or self.held_bytes + self.bytes_of(*shape) <= self.cap_bytes:
            return True
        else:
            why = (
                f"its cache ({self.bytes_of(*shape) / 2**30:.2f} GiB) would pass the caches' "
                f"cap ({self.held_bytes / 2**30:.2f} of {self.cap_bytes / 2**30:.2f} GiB held, "
                "engine.hf.static_cache_gib)"
            )
        self.eager_batches += 1
        if shape not in self._refused:
            self._refused.add(shape)
            log.warning(
                "engine.hf.compile: batches of %d rows x %d tokens run eagerly: %s",
                rung,
                length,
                why,
            )
        return False

    def drop(self, rung: int, length: int) -> None:
        """Forget a shape whose compile failed: its cache goes, its batches run eagerly."""
        self.by_shape.pop((rung, length), None)
        self.failed.add((rung, length))
        self._refused.add((rung, length))  # drop's caller warned

    def get(self, rung: int, length: int) -> Any:
        """The shape's cache, emptied (call inside inference mode, after ``fits``)."""
        from transformers import StaticCache

        cache = self.by_shape.get((rung, length))
        if cache is None:
            log.info(
                "hf engine: a static cache of %d rows x %d tokens, %.2f GiB (compiles)",
                rung,
                length,
                self.bytes_of(rung, length) / 2**30,
            )
            cache = self.by_shape[rung, length] = StaticCache(
                config=self.text_config, max_cache_len=length
            )
        cache.reset()
        return cache
