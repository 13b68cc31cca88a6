"""TensorRT-LLM engine: Qwen2.5-VL through the LLM API (PyTorch backend).

Every TensorRT-LLM name this module touches is listed in ``tests/data/trtllm_api_surface.json``
(read from upstream source); ``tests/engines/test_trtllm_contract.py`` runs this engine against a
stand-in built from that file, so a keyword the real API lacks fails a test here, not a job on a
GPU cluster. Names used: ``tensorrt_llm.LLM`` (+ ``generate_async``, ``shutdown``,
``__version__``), ``tensorrt_llm.SamplingParams``, ``tensorrt_llm.llmapi.KvCacheConfig``,
``tensorrt_llm.llmapi.CudaGraphConfig`` and ``tensorrt_llm.llmapi.GuidedDecodingParams``; results
are read through ``RequestOutput.result()``, ``.prompt_token_ids`` and
``.outputs[0].text / .token_ids / .finish_reason``.

Guided decoding: with ``structured.json_schema`` set and ``structured.guided`` not ``off``, the LLM
is built with ``guided_decoding_backend="xgrammar"`` (``engine.options`` may name another) and
every request carries ``GuidedDecodingParams(json=<the schema as JSON text>)``, so answers are JSON
in the schema (``engine.guided`` is True). xgrammar (0.1.21 and 0.2.8 checked) does not enforce
``uniqueItems``: the parser reports an answer that repeats an item.

The runner hands over images already resized to the Qwen grid, so the engine only renders the
chat template of the model directory and submits ``{"prompt", "multi_modal_data",
"mm_processor_kwargs"}`` requests (``do_resize=False``: TensorRT-LLM's HF processor must not
resize an image again, which it would below its own ``min_pixels``, changing the vision-token
count the runner computed).

Feeding (the stream seam, see ``engines/base.py``): every ``generate_async`` call is made from one
thread, an asyncio event loop the engine owns, as ``trtllm-bench`` does. Upstream's submit path
is not thread-safe (an unlocked client-id counter, one ZeroMQ socket written without a lock),
and a request submitted from a running loop gets an async result queue, so each request is one
task on that loop: submit, then ``await handle.aresult()`` with a deadline. The actor keeps
``engine.trtllm.max_inflight_requests`` requests inside (default twice the engine's
``max_batch_size``), so a request is always waiting in TensorRT-LLM's scheduler when a sequence
finishes; results go back one by one as each finishes.

Faults: a request past ``request_timeout_s`` is aborted and tried once more, then it is an
ENGINE_TIMEOUT row; a per-request failure (upstream's ``RequestError``, or a refusal by
``generate_async``) is an ENGINE_ERROR row for that row alone; an executor that is shut down
("LLM is shutting down", a background error raised from a result) makes the engine dead: the
actor exits, is replaced, and its units run again.

Sampling fidelity on TensorRT-LLM 1.2.x: generation stops on every EOS id of the model's
generation_config (``stop_token_ids``; 1.2.x stops on the tokenizer's eos only), and a job with
``repetition_penalty`` != 1 runs the TRTLLMSampler, since 1.2's default TorchSampler ignores
penalties (upstream issue #9442; from 1.3 the TorchSampler applies them and the option is gone).
tensorrt_llm is imported lazily: this module imports (and its pure helpers test) without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import Config, check
from ..errors import RowError
from ..rows.images import TILE, vision_tokens
from ..rows.prompts import chat_messages
from . import settings_of
from .base import Engine, EngineDead, EngineError, Request, Result, ResultSink

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"  # Qwen2.5-VL image placeholder; the processor expands it per image
IMAGE_TOKEN_ID = 151655  # its id in the Qwen2.5-VL vocabulary (config.json: image_token_id)
DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2.5-VL's template adds without one
PROMPT_CACHE_SIZE = 4096  # distinct (prompt, system) pairs whose rendering is kept
QWEN_EOS = ("<|im_end|>", "<|endoftext|>")  # Qwen2.5-VL-Instruct's generation_config eos ids
# What TensorRT-LLM's Qwen2-VL input processor forwards to the HF processor call: the runner
# already resized every image to the 28-pixel grid within image.min/max_pixels.
MM_PROCESSOR_KWARGS = {"do_resize": False}
REQUEST_TRIES = 2  # a request that times out is aborted and tried once more
ABORT_GRACE_S = 10.0  # how long an aborted request may take to come back 'cancelled'
WARMUP_MAX_TOKENS = 8  # the warm-up pays start-up costs, not decode

INSTALL_HINT = (
    "engine 'trtllm' needs TensorRT-LLM: run in NVIDIA's TensorRT-LLM release container "
    "(nvcr.io/nvidia/tensorrt-llm/release), or `pip install tensorrt_llm` on a Linux machine "
    "with CUDA (Python 3.10 or 3.12). `qvl-batch doctor` shows what is missing."
)


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
        "trust_remote_code": False,  # never run model-repo code unless engine.options says so
    }
    # Versions that check prompts against max_input_len (default 1024) must not refuse a long
    # vision prompt (up to 1280 image tokens plus text) that max_seq_len allows.
    kwargs["max_input_len"] = t.max_seq_len
    if guided_schema(cfg) is not None:
        # Without a backend the executor refuses requests that carry GuidedDecodingParams.
        kwargs["guided_decoding_backend"] = "xgrammar"
    if cfg.sampling.repetition_penalty != 1.0 and penalties_need_trtllm_sampler(api):
        kwargs["sampler_type"] = "TRTLLMSampler"
    kwargs.update(cfg.engine.options)
    return kwargs


def penalties_need_trtllm_sampler(api: ModuleType) -> bool:
    """True before 1.3: 1.2.x's default TorchSampler accepts repetition_penalty and ignores it
    (upstream issue #9442; fixed by PR #16485 in 1.3, which also removed ``sampler_type``)."""
    version = str(getattr(api, "__version__", "0"))
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) < (1, 3)


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


def eos_token_ids(model: str, tokenizer: Any) -> list[int]:
    """Every EOS id the model's generation_config.json (and config.json) names; Qwen2.5-VL's
    two (``<|im_end|>``, ``<|endoftext|>``) from the tokenizer where neither file says."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if ids:
        return ids
    for token in QWEN_EOS:
        try:
            tid = tokenizer.convert_tokens_to_ids(token)
        except Exception:
            continue
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.append(tid)
    return ids


def largest_grid(max_pixels: int) -> tuple[int, int]:
    """(width, height) of the largest image the runner can hand over: the most 28x28 patches
    within ``max_pixels``, the squarest such grid."""
    patches = max(1, max_pixels // TILE**2)
    _, side = max((s * (patches // s), s) for s in range(1, math.isqrt(patches) + 1))
    return TILE * side, TILE * (patches // side)


def qwen_chat_text(prompt: str, system: str | None) -> str:
    """What Qwen2.5-VL's own chat template renders for :func:`chat_messages`.

    Used only where the template cannot be rendered because jinja2 is missing (transformers needs
    it for chat templates; every torch install brings it, so a GPU host never takes this path).
    """
    return (
        f"<|im_start|>system\n{DEFAULT_SYSTEM if system is None else system}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD}<|vision_end|>{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def load_template_source(model: str) -> Any:
    """The model's processor (it owns the chat template), else its tokenizer.

    AutoProcessor needs the image-processor files and, in some transformers versions, torch or
    torchvision; the tokenizer carries the same Qwen2.5-VL template, so it is the fallback.
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
        if getattr(processor, "chat_template", None) and hasattr(processor, "tokenizer"):
            return processor
    except Exception as exc:
        log.debug("AutoProcessor unavailable for %s (%s); using AutoTokenizer", model, exc)
    return AutoTokenizer.from_pretrained(model, trust_remote_code=False)


def render_chat(source: Any, prompt: str, system: str | None) -> str:
    """The chat-templated prompt text, with one image placeholder, ready for generation."""
    messages = chat_messages(prompt, system)
    try:
        text = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ImportError as exc:  # jinja2 missing: render Qwen2.5-VL's template directly
        _warn_builtin_template(str(exc))
        return qwen_chat_text(prompt, system)
    return text[0] if isinstance(text, list) else text


@lru_cache(maxsize=1)
def _warn_builtin_template(reason: str) -> None:
    log.warning("chat template not renderable (%s); using the built-in Qwen2.5-VL one", reason)


def read_model_config(model: str) -> dict[str, Any]:
    """The model directory's config.json, or {} (hub names, remote URLs, unreadable files)."""
    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def image_token_id(model_config: dict[str, Any], tokenizer: Any) -> int:
    """Id of ``<|image_pad|>``: from config.json, else the tokenizer, else Qwen2.5-VL's."""
    if isinstance(model_config.get("image_token_id"), int):
        return model_config["image_token_id"]
    try:
        tid = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    except Exception:
        tid = None
    if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
        return tid
    return IMAGE_TOKEN_ID


def vocab_size(model_config: dict[str, Any]) -> int | None:
    """The text vocabulary size (top level, or under text_config in newer configs)."""
    size = model_config.get("vocab_size") or (model_config.get("text_config") or {}).get(
        "vocab_size"
    )
    return size if isinstance(size, int) else None


def count_vision_tokens(ids: list[int], image_id: int, vocab: int | None) -> int:
    """Image tokens in a processed prompt.

    Some TensorRT-LLM versions replace the expanded image pads with out-of-vocabulary ids
    (>= vocab size) before returning ``prompt_token_ids``; those are counted when no pad is left.
    """
    n = sum(1 for i in ids if i == image_id)
    if n == 0 and vocab:
        n = sum(1 for i in ids if i >= vocab)
    return n


def to_result(request: Request, output: Any, image_id: int, vocab: int | None) -> Result:
    """Map a finished RequestOutput to a Result; counts fall back to the runner's own. A request
    the runtime timed out or cancelled is an error row, not a truncated answer."""
    completion = output.outputs[0]
    if completion.finish_reason == "timeout":
        msg = "TensorRT-LLM timed the request out (finish_reason 'timeout')"
        return Result(request.key, error_code=RowError.ENGINE_TIMEOUT, error_message=msg)
    if completion.finish_reason == "cancelled":
        msg = "TensorRT-LLM cancelled the request (finish_reason 'cancelled')"
        return Result(request.key, error_code=RowError.ENGINE_ERROR, error_message=msg)
    ids = list(output.prompt_token_ids or [])
    vision = count_vision_tokens(ids, image_id, vocab) or request.vision_tokens
    return Result(
        request.key,
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=len(ids) or request.text_tokens + request.vision_tokens,
        vision_tokens=vision,
        output_tokens=len(completion.token_ids),
    )


def error_result(request: Request, exc: BaseException) -> Result:
    """A failed row: this request only, the others are unaffected."""
    return Result(
        request.key, error_code=RowError.ENGINE_ERROR, error_message=f"{type(exc).__name__}: {exc}"
    )


def is_request_error(exc: BaseException) -> bool:
    """Upstream's per-request failure (``tensorrt_llm.executor.utils.RequestError``): the
    executor lives on. Told by class name, so no executor module need be imported."""
    return any(cls.__name__ == "RequestError" for cls in type(exc).__mro__)


def is_shut_down(exc: BaseException) -> bool:
    """``generate_async``'s refusal once the executor is shut down ("LLM is shutting down")."""
    return isinstance(exc, RuntimeError) and "shutting down" in str(exc)


class TrtLlmEngine(Engine):
    """Qwen2.5-VL on TensorRT-LLM's LLM API; one instance per actor (per GPU or TP group)."""

    name = "trtllm"
    version = "unknown"

    def __init__(self, cfg: Config):
        api = import_trtllm()
        self.version = str(getattr(api, "__version__", "unknown"))
        self.cfg = cfg
        model = cfg.engine.model
        self._template = load_template_source(model)
        self._tokenizer = getattr(self._template, "tokenizer", self._template)
        self._tokenizer_lock = threading.Lock()  # prepare threads count tokens concurrently
        model_config = read_model_config(model)
        self._image_id = image_token_id(model_config, self._tokenizer)
        self._vocab = vocab_size(model_config)
        self._render = lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._render_uncached)
        self._count = lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._count_uncached)
        sampling = sampling_kwargs(cfg, eos_token_ids(model, self._tokenizer))
        schema = guided_schema(cfg)
        if schema is not None:
            # TensorRT-LLM takes a str, dict or pydantic model and json.dumps a dict itself;
            # sending our own text keeps any dict-like config object out of its type checks.
            guide = api.llmapi.GuidedDecodingParams(json=json.dumps(schema))
            sampling["guided_decoding"] = guide
        self.guided = schema is not None
        self._sampling = api.SamplingParams(**sampling)
        warm_tokens = min(WARMUP_MAX_TOKENS, cfg.sampling.max_tokens)
        self._warm_sampling = api.SamplingParams(**{**sampling, "max_tokens": warm_tokens})
        t = settings_of(cfg, "trtllm")
        self._bound = t.max_inflight_requests or 2 * t.max_batch_size
        self.entry_group = max(1, self._bound // 8)
        self._timeout = t.request_timeout_s
        self._sink: ResultSink | None = None
        self._dead: BaseException | None = None
        self._submit_s = 0.0  # seconds inside generate_async (its preprocessing), one thread
        self._submitted = 0
        self.llm: Any = api.LLM(**llm_kwargs(cfg, api))
        # The one thread that calls generate_async: an event loop, as trtllm-bench uses.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-submit")
        self._thread.daemon = True
        self._thread.start()
        log.info("TensorRT-LLM %s loaded %s", self.version, model)

    def _render_uncached(self, prompt: str, system: str | None) -> str:
        return render_chat(self._template, prompt, system)

    def _count_uncached(self, prompt: str, system: str | None) -> int:
        text = self._render(prompt, system)
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(text, add_special_tokens=False)
        return len(ids) - ids.count(self._image_id)

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        """Text tokens of the templated prompt, without the image pads (cached per prompt)."""
        return self._count(prompt, system)

    def inputs(self, request: Request) -> dict[str, Any]:
        """The PromptInputs dict for one request: templated text plus its (resized) image."""
        return {
            "prompt": self._render(request.prompt, request.system),
            "multi_modal_data": {"image": [request.image]},
            "mm_processor_kwargs": dict(MM_PROCESSOR_KWARGS),
        }

    # ---- the stream seam ----------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self._bound

    def start(self, sink: ResultSink) -> None:
        self._sink = sink
        if self._dead is not None:  # it died in the warm-up
            sink.fail(EngineDead(f"{type(self._dead).__name__}: {self._dead}"))

    def submit(self, requests: list[Request]) -> None:
        """On record with the driver, then onto the submit loop; returns at once."""
        if self.llm is None:
            raise EngineError("the trtllm engine is closed")
        sink = self._sink
        assert sink is not None, "start() first"
        sink.entering([r.key for r in requests])
        self._loop.call_soon_threadsafe(self._spawn, requests, sink.put, self._sampling)

    def stage_times(self) -> dict[str, float]:
        return {"submit": round(self._submit_s, 4), "submitted": float(self._submitted)}

    def reset_stage_times(self) -> None:
        self._submit_s, self._submitted = 0.0, 0

    def warmup(self) -> None:
        """One request alone, then a full window of the largest images the job allows: the
        first large batch would otherwise pay the vision encoder's workspace resize (1.2.x) and
        the first concurrent submits in real work."""
        from PIL import Image

        width, height = largest_grid(self.cfg.image.max_pixels)
        tokens = vision_tokens(height, width)
        image = Image.new("RGB", (width, height), (128, 128, 128))
        text = self.count_text_tokens("Describe this image.", self.cfg.prompt.system)
        for n in (1, self._bound):
            requests = [
                Request(
                    ("warmup", i),
                    "warmup",
                    "Describe this image.",
                    self.cfg.prompt.system,
                    image,
                    "",
                    tokens,
                    text,
                )
                for i in range(n)
            ]
            results = self._run_now(requests, self._warm_sampling)
            failed = [r for r in results if r.error_code]
            if failed:
                log.warning("warm-up: %d of %d failed: %s", len(failed), n, failed[0].error_message)

    def _run_now(self, requests: list[Request], sampling: Any) -> list[Result]:
        """Submit ``requests`` through the loop and wait for all of them (warm-up)."""
        done = threading.Event()
        results: list[Result] = []

        def put(result: Result) -> None:
            results.append(result)  # called on the loop thread only
            if len(results) == len(requests):
                done.set()

        self._loop.call_soon_threadsafe(self._spawn, requests, put, sampling)
        deadline = time.monotonic() + REQUEST_TRIES * (self._timeout + ABORT_GRACE_S)
        while not done.wait(0.5):
            if self._dead is not None:
                raise EngineDead(f"the executor died in warm-up: {self._dead!r}")
            if time.monotonic() > deadline:
                raise EngineError("warm-up requests never came back")
        return results

    # ---- on the submit loop (one thread) ------------------------------------------------
    def _spawn(self, requests: list[Request], put, sampling: Any) -> None:
        for request in requests:
            self._loop.create_task(self._run(request, put, sampling))

    async def _run(self, request: Request, put, sampling: Any) -> None:
        """One request: submit (this loop's thread is the only caller of generate_async),
        await its result with a deadline; abort and retry once on timeout."""
        for attempt in range(1, REQUEST_TRIES + 1):
            if self._dead is not None:
                return  # the actor is going away; its units run again elsewhere
            t0 = time.perf_counter()
            try:
                handle = self.llm.generate_async(self.inputs(request), sampling_params=sampling)
            except Exception as exc:
                if is_shut_down(exc):
                    return self._die(exc)
                return put(error_result(request, exc))  # refused: this row alone
            finally:
                self._submit_s += time.perf_counter() - t0
                self._submitted += 1
            try:
                output = await asyncio.wait_for(handle.aresult(), self._timeout)
            except asyncio.TimeoutError:
                await self._abort(handle)
                log.warning(
                    "request %s: no answer in %.0fs (try %d)", request.key, self._timeout, attempt
                )
                continue
            except Exception as exc:
                if is_request_error(exc):
                    return put(error_result(request, exc))
                return self._die(exc)  # a background error: the executor is shut down
            return put(to_result(request, output, self._image_id, self._vocab))
        msg = (
            f"no answer within engine.trtllm.request_timeout_s={self._timeout:g}s, "
            f"{REQUEST_TRIES} tries (each aborted)"
        )
        put(Result(request.key, error_code=RowError.ENGINE_TIMEOUT, error_message=msg))

    async def _abort(self, handle: Any) -> None:
        """Abort a request and give it a moment to come back 'cancelled' (freeing its slot)."""
        try:
            handle.abort()
            await asyncio.wait_for(handle.aresult(), ABORT_GRACE_S)
        except Exception as exc:  # it may never come back; its slot is TensorRT-LLM's to free
            log.debug("aborted request: %s: %s", type(exc).__name__, exc)

    def _die(self, exc: BaseException) -> None:
        if self._dead is not None:
            return
        self._dead = exc
        log.error("TensorRT-LLM executor is dead: %s: %s", type(exc).__name__, exc)
        if self._sink is not None:
            self._sink.fail(EngineDead(f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        """Shut the LLM down (frees the GPU), then the submit loop; safe to call twice."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def make_trtllm_engine(cfg: Config, incarnation: int = 0) -> TrtLlmEngine:
    """The registry's builder (a model load does not depend on the incarnation)."""
    return TrtLlmEngine(cfg)
