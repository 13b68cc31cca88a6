"""TensorRT-LLM engine: Qwen2.5-VL through the LLM API (PyTorch backend).

Every TensorRT-LLM name this module touches is listed in ``tests/data/trtllm_api_surface.json``
(read from upstream source); ``tests/test_trtllm_contract.py`` runs this engine against a
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
chat template of the model directory and submits ``{"prompt", "multi_modal_data"}`` requests.
TensorRT-LLM runs its multimodal preprocessing inside ``generate_async`` in the caller's thread,
so requests are submitted from a small thread pool, with a semaphore bounding those in flight.
tensorrt_llm is imported lazily: this module imports (and its pure helpers test) without it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import Config
from .base import Engine, EngineError, Request, Result

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"  # Qwen2.5-VL image placeholder; the processor expands it per image
IMAGE_TOKEN_ID = 151655  # its id in the Qwen2.5-VL vocabulary (config.json: image_token_id)
DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2.5-VL's template adds without one
PROMPT_CACHE_SIZE = 4096  # distinct (prompt, system) pairs whose rendering is kept

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
    t = cfg.engine.trtllm
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
    if guided_schema(cfg) is not None:
        # Without a backend the executor refuses requests that carry GuidedDecodingParams.
        kwargs["guided_decoding_backend"] = "xgrammar"
    kwargs.update(cfg.engine.options)
    return kwargs


def guided_schema(cfg: Config) -> dict[str, Any] | None:
    """The JSON schema answers are constrained to; None without one or with guided=off."""
    structured = cfg.structured
    if structured.json_schema is None or structured.guided == "off":
        return None
    return structured.json_schema


def sampling_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``SamplingParams(...)``: max_tokens always (its default is 32).

    Temperature 0 means greedy: TensorRT-LLM wants temperature > 0 and treats top_k=1 (with
    top_p unset) as greedy, so greedy jobs send exactly that. A neutral repetition penalty is
    left unset, which keeps the runtime on its default path.
    """
    s = cfg.sampling
    greedy = s.temperature == 0
    return {
        "max_tokens": s.max_tokens,
        "temperature": None if greedy else s.temperature,
        "top_p": None if greedy else s.top_p,
        "top_k": 1 if greedy else (s.top_k or None),
        "repetition_penalty": None if s.repetition_penalty == 1.0 else s.repetition_penalty,
        "seed": s.seed,
    }


def chat_messages(prompt: str, system: str | None) -> list[dict[str, Any]]:
    """One user turn with one image then the prompt, after an optional system turn."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    user = [{"type": "image"}, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": user})
    return messages


def qwen_chat_text(prompt: str, system: str | None) -> str:
    """What Qwen2.5-VL's own chat template renders for :func:`chat_messages`.

    Used only where the template cannot be rendered because jinja2 is missing (transformers needs
    it for chat templates; every torch install brings it, so a GPU host never takes this path).
    """
    return (
        f"<|im_start|>system\n{system or DEFAULT_SYSTEM}<|im_end|>\n"
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
    """Map a finished RequestOutput to a Result; counts fall back to the runner's own."""
    completion = output.outputs[0]
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
    """A failed row: this request only, the rest of the batch is unaffected."""
    return Result(
        request.key, error_code="ENGINE_ERROR", error_message=f"{type(exc).__name__}: {exc}"
    )


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
        self._tokenizer_lock = threading.Lock()  # fast tokenizers dislike concurrent calls
        model_config = read_model_config(model)
        self._image_id = image_token_id(model_config, self._tokenizer)
        self._vocab = vocab_size(model_config)
        self._render = lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._render_uncached)
        self._count = lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._count_uncached)
        sampling = sampling_kwargs(cfg)
        schema = guided_schema(cfg)
        if schema is not None:
            # TensorRT-LLM takes a str, dict or pydantic model and json.dumps a dict itself;
            # sending our own text keeps any dict-like config object out of its type checks.
            guide = api.llmapi.GuidedDecodingParams(json=json.dumps(schema))
            sampling["guided_decoding"] = guide
        self.guided = schema is not None
        self._sampling = api.SamplingParams(**sampling)
        t = cfg.engine.trtllm
        # At least one: a zero would block every submission forever (config does not check it).
        self._inflight = threading.Semaphore(max(1, t.max_inflight_requests))
        self._pool = ThreadPoolExecutor(t.submit_threads, thread_name_prefix="trtllm-submit")
        try:
            self.llm: Any = api.LLM(**llm_kwargs(cfg, api))
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
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
        }

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit every request from the pool, collect them; a failing row fails alone.

        Requests are collected in the order they were handed to TensorRT-LLM (a queue), never
        in input order: each collected one was already submitted, so waiting on it always ends
        and frees its in-flight slot; waiting in input order could wait on a request still
        queued for a slot held by later ones.
        """
        if self.llm is None:
            raise EngineError("the trtllm engine is closed")
        done: queue.Queue = queue.Queue()
        for request in requests:
            self._pool.submit(self._submit, request, done)
        return [self._collect(*done.get()) for _ in requests]

    def _submit(self, request: Request, done: queue.Queue) -> None:
        """Runs in the submit pool: hold an in-flight slot, enqueue (request, handle, error)."""
        self._inflight.acquire()
        try:
            handle = self.llm.generate_async(self.inputs(request), sampling_params=self._sampling)
        except Exception as exc:
            self._inflight.release()
            done.put((request, None, exc))
            return
        done.put((request, handle, None))

    def _collect(self, request: Request, handle: Any, error: Exception | None) -> Result:
        """Wait for one submitted request (holding its slot until done) and map it."""
        if handle is None:
            return error_result(request, error or RuntimeError("not submitted"))
        try:
            return to_result(request, handle.result(), self._image_id, self._vocab)
        except Exception as exc:
            return error_result(request, exc)
        finally:
            self._inflight.release()

    def close(self) -> None:
        """Stop submitting and shut the LLM down (frees the GPU); safe to call twice."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        llm.shutdown()
