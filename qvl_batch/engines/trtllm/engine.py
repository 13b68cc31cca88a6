"""The trtllm engine: one event loop thread submits every request and awaits its result."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from functools import lru_cache
from typing import Any

from ...config import Config
from ...errors import RowError
from ...rows.images import TILE, vision_tokens
from .. import settings_of
from ..base import Engine, EngineDead, EngineError, Request, Result, ResultSink
from .api import guided_schema, import_trtllm, llm_kwargs, sampling_kwargs
from .faults import (
    Breaker,
    executor_down,
    is_fatal,
    is_out_of_memory,
    is_request_error,
    is_shut_down,
)
from .outputs import error_result, to_result
from .prompts import (
    check_image_bounds,
    eos_token_ids,
    image_token_id,
    load_template_source,
    read_model_config,
    render_chat,
    vocab_size,
)

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 4096  # distinct (prompt, system) pairs whose rendering is kept

REQUEST_TRIES = 2  # a request that times out or runs out of memory is tried once more

ABORT_GRACE_S = 10.0  # how long an aborted request may take to come back 'cancelled'

WARMUP_MAX_TOKENS = 8  # the warm-up pays start-up costs, not decode

HEALTH_POLL_S = 1.0  # how often the health thread looks at the executor's shutdown flag

CLOSE_TIMEOUT_S = 30.0  # a shutdown that blocks longer (a dead worker) is left behind


def largest_grid(max_pixels: int) -> tuple[int, int]:
    """(width, height) of the largest image the runner can hand over: the most 28x28 patches
    within ``max_pixels``, the squarest such grid."""
    patches = max(1, max_pixels // TILE**2)
    _, side = max((s * (patches // s), s) for s in range(1, math.isqrt(patches) + 1))
    return TILE * side, TILE * (patches // side)


class TrtLlmEngine(Engine):
    """Qwen2.5-VL on TensorRT-LLM's LLM API; one instance per actor (per GPU or TP group)."""

    name = "trtllm"
    version = "unknown"

    def __init__(self, cfg: Config):
        api = import_trtllm()
        self.version = str(getattr(api, "__version__", "unknown"))
        self.cfg = cfg
        model = cfg.engine.model
        check_image_bounds(cfg)  # again where the model directory is read: the GPU host
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
        self._closing = False
        self._breaker = Breaker(t.max_batch_size)
        self._last_answer = time.monotonic()  # any response, success or error
        self._tasks: set[asyncio.Task] = set()  # kept: a task's exception is never lost
        self._submit_s = 0.0  # seconds inside generate_async (its preprocessing), one thread
        self._submitted = 0
        self.llm: Any = api.LLM(**llm_kwargs(cfg, api))
        # The one thread that calls generate_async: an event loop, as trtllm-bench uses.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-submit")
        self._thread.daemon = True
        self._thread.start()
        # Outside the loop, which a blocking call into a dead executor can freeze.
        self._health = threading.Thread(target=self._watch_health, name="trtllm-health")
        self._health.daemon = True
        self._health.start()
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
            task = self._loop.create_task(self._run(request, put, sampling))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, request: Request, put, sampling: Any) -> None:
        """One request, whatever happens inside: a result, or the engine declared dead."""
        try:
            result = await self._attempts(request, sampling)
        except Exception as exc:  # a bug here must not lose the row
            log.exception("request %s: unexpected failure", request.key)
            result = error_result(request, exc)
        if result is not None and not self._closing:
            put(result)

    async def _attempts(self, request: Request, sampling: Any) -> Result | None:
        """Submit (this loop's thread is the only caller of generate_async) and await the
        answer with a deadline; a timeout or an out-of-memory error is tried once more. None:
        the engine is dead, the row is not condemned (its unit runs again elsewhere)."""
        for attempt in range(1, REQUEST_TRIES + 1):
            if self._dead is not None or self._closing:
                return None
            t0 = time.perf_counter()
            try:
                handle = self.llm.generate_async(self.inputs(request), sampling_params=sampling)
            except Exception as exc:
                if is_shut_down(exc) or executor_down(self.llm) or is_fatal(exc):
                    return self._die(exc)  # 1.2 raises the background error itself first
                return error_result(request, exc)  # refused: this row alone
            finally:
                self._submit_s += time.perf_counter() - t0
                self._submitted += 1
            try:
                output = await self._answer(request, handle)
            except asyncio.TimeoutError:
                await self._abort(handle)
                log.warning(
                    "request %s: no answer in %.0fs (try %d)", request.key, self._timeout, attempt
                )
                continue
            except Exception as exc:
                self._last_answer = time.monotonic()
                if not is_request_error(exc) or is_fatal(exc):
                    return self._die(exc)
                if is_out_of_memory(exc) and attempt < REQUEST_TRIES:
                    log.warning("request %s: %s; tried once more", request.key, exc)
                    continue
                if self._breaker.error():
                    return self._die(
                        EngineDead(
                            f"{self._breaker.run} requests failed in a row, "
                            f"none succeeded: last {exc}"
                        )
                    )
                return error_result(request, exc)
            self._last_answer = time.monotonic()
            self._breaker.success()
            return to_result(request, output, self._image_id, self._vocab)
        msg = (
            f"no answer within engine.trtllm.request_timeout_s={self._timeout:g}s, "
            f"{REQUEST_TRIES} tries (each aborted)"
        )
        return Result(request.key, error_code=RowError.ENGINE_TIMEOUT, error_message=msg)

    async def _answer(self, request: Request, handle: Any) -> Any:
        """The request's output; TimeoutError once it waited ``request_timeout_s`` while other
        requests were answered. While nothing at all answers, it keeps waiting: an abort would
        be a blocking send into a worker that may be dead, and whether the engine stalled is
        the actor watchdog's call (``limits.stall_s``)."""
        while True:
            try:
                return await asyncio.wait_for(handle.aresult(), self._timeout)  # cancel-safe
            except asyncio.TimeoutError:
                if time.monotonic() - self._last_answer < self._timeout:
                    raise
                log.warning(
                    "request %s: no answer of any request for %.0f s; not aborted",
                    request.key,
                    time.monotonic() - self._last_answer,
                )

    async def _abort(self, handle: Any) -> None:
        """Abort a request and give it a moment to come back 'cancelled' (freeing its slot)."""
        try:
            handle.abort()
            await asyncio.wait_for(handle.aresult(), ABORT_GRACE_S)
            self._last_answer = time.monotonic()
        except Exception as exc:  # a waiting request never comes back; its slot is freed
            log.debug("aborted request: %s: %s", type(exc).__name__, exc)

    # ---- any thread ---------------------------------------------------------------------
    def _watch_health(self) -> None:
        """Declares the engine dead once the executor shuts down (a background error): 1.2
        tells the requests still inside nothing of it."""
        while not self._closing and self._dead is None:
            llm = self.llm
            if llm is not None and executor_down(llm):
                self._die(EngineDead("the TensorRT-LLM executor shut down"))
                return
            time.sleep(HEALTH_POLL_S)

    def _die(self, exc: BaseException) -> None:
        if self._dead is not None or self._closing:
            return None
        self._dead = exc
        log.error("TensorRT-LLM executor is dead: %s: %s", type(exc).__name__, exc)
        if self._sink is not None:
            self._sink.fail(EngineDead(f"{type(exc).__name__}: {exc}"))
        return None

    def close(self) -> None:
        """Stop submitting, then shut the LLM down on the loop thread (never beside a submit;
        upstream's sockets are not thread-safe), waiting at most CLOSE_TIMEOUT_S: a dead worker
        can block the shutdown for good, and the actor's exit kills it. Safe to call twice."""
        llm = self.llm
        if llm is None:
            return
        self._closing = True  # before the LLM goes: no task submits to it any more
        self.llm = None
        done = threading.Event()

        def shutdown() -> None:
            try:
                llm.shutdown()
            except Exception as exc:
                log.warning("TensorRT-LLM shutdown failed: %s: %s", type(exc).__name__, exc)
            finally:
                done.set()
                self._loop.stop()

        self._loop.call_soon_threadsafe(shutdown)
        if not done.wait(CLOSE_TIMEOUT_S):
            log.warning("TensorRT-LLM shutdown still blocked after %.0f s; left", CLOSE_TIMEOUT_S)
            return
        self._thread.join(timeout=10)


def make_trtllm_engine(cfg: Config, incarnation: int = 0) -> TrtLlmEngine:
    """The registry's builder (a model load does not depend on the incarnation)."""
    return TrtLlmEngine(cfg)
