"""Builds the stand-in API from ``tests/data/trtllm_api_surface.json`` (see the package docstring).

Every class accepts exactly the keyword names that file lists for it (REQUIRED ones required) and
rejects any other, as TensorRT-LLM's pydantic args (extra='forbid') and kw-only dataclasses do.
Nothing here is hand-written per field: a name added to or removed from the JSON changes what the
stand-in accepts.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .executor.utils import RequestError

SURFACE_PATH = Path(__file__).resolve().parents[2] / "data" / "trtllm_api_surface.json"
SURFACE: dict[str, Any] = json.loads(SURFACE_PATH.read_text())

IMAGE_PAD = "<|image_pad|>"
DEFAULT_IMAGE_TOKEN_ID = 151655  # Qwen2.5-VL; a model dir's config.json may say otherwise
DEFAULT_VOCAB = 151643
PATCH = 28  # one Qwen2.5-VL vision token per 28x28 pixels
WORDS = ("a", "photo", "of", "cat", "dog", "tree", "sky", "river", "city", "red", "blue", "old")


class ContractError(TypeError, ValueError):
    """A call the real API would refuse (unknown or missing keyword, wrong input shape)."""


@dataclass(frozen=True)
class Param:
    name: str
    required: bool
    default: Any


def _default(desc: str) -> Any:
    """The Python value of a rendered default ("32", "'auto'", "None (...)"), else the text."""
    for text in (desc, desc.split(" ")[0]):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
    return desc


def params(*sections: dict[str, str]) -> dict[str, Param]:
    """Constructor/call parameters from JSON sections; properties are not parameters."""
    out: dict[str, Param] = {}
    for section in sections:
        for name, desc in section.items():
            if desc.startswith("property"):
                continue
            required = desc.startswith("REQUIRED")
            out[name] = Param(name, required, None if required else _default(desc))
    return out


def bare_name(entry: str) -> str:
    """'mm_embedding_handle (1.0-era)' -> 'mm_embedding_handle'; 'result()' -> 'result'."""
    return entry.split(" ")[0].split("(")[0]


def bind(what: str, spec: dict[str, Param], args: tuple, kwargs: dict[str, Any]) -> dict:
    """Check a call against ``spec`` (positional args fill names in order) and return its kwargs."""
    if len(args) > len(spec):
        raise ContractError(f"{what}() takes {len(spec)} arguments, got {len(args)} positional")
    bound = dict(zip(spec, args))
    doubled = sorted(set(bound) & set(kwargs))
    if doubled:
        raise ContractError(f"{what}() got multiple values for {doubled}")
    bound.update(kwargs)
    unknown = sorted(set(bound) - set(spec))
    if unknown:
        raise ContractError(
            f"{what}(): unexpected keyword(s) {unknown}; extra inputs not permitted"
        )
    missing = [p.name for p in spec.values() if p.required and p.name not in bound]
    if missing:
        raise ContractError(f"{what}(): missing required argument(s) {missing}")
    return bound


class KwOnly:
    """A stand-in constructor: keyword-only, exactly the names in ``PARAMS``."""

    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        if args:
            raise ContractError(f"{type(self).__name__}() takes keyword arguments only")
        given = bind(type(self).__name__, self.PARAMS, (), kwargs)
        for name, p in self.PARAMS.items():
            setattr(self, name, given.get(name, p.default))
        self.passed_kwargs = given  # what the caller passed (tests inspect it)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.passed_kwargs!r})"


def kw_only_class(name: str, spec: dict[str, Param]) -> type:
    return type(name, (KwOnly,), {"PARAMS": spec, "__doc__": f"Stand-in {name} (JSON fields)."})


def home(section: dict[str, Any], default: str) -> str:
    """The module a class is imported from, per the JSON's "import"/"entry" (else ``default``)."""
    path = section.get("import") or section.get("entry") or ""
    path = path.split(" ")[0]
    return path.rsplit(".", 1)[0] if "." in path else default


GuidedDecodingParams = kw_only_class(
    "GuidedDecodingParams", params(SURFACE["GuidedDecodingParams"]["fields"])
)


class SamplingParams(kw_only_class("SamplingParams", params(SURFACE["SamplingParams"]["fields"]))):
    """Stand-in ``SamplingParams``; ``guided_decoding`` checked as upstream's ``_validate`` does."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        guide = self.passed_kwargs.get("guided_decoding")
        if guide is None:
            return
        if not isinstance(guide, GuidedDecodingParams):
            raise ContractError(f"guided_decoding must be a GuidedDecodingParams, got {guide!r}")
        guides = sorted(n for n, v in guide.passed_kwargs.items() if v)
        if len(guides) > 1:
            raise ContractError(f"Only one guide can be used for a request, but got {guides}")


KvCacheConfig = kw_only_class("KvCacheConfig", params(SURFACE["KvCacheConfig"]["fields"]))
CudaGraphConfig = kw_only_class("CudaGraphConfig", params(SURFACE["CudaGraphConfig"]["fields"]))
CompletionOutput = kw_only_class("CompletionOutput", params(SURFACE["CompletionOutput"]["fields"]))

# Where each class lives. The JSON gives no import path for CudaGraphConfig: like KvCacheConfig it
# is defined in llmapi/llm_args.py, and upstream examples import it from tensorrt_llm.llmapi.
HOMES = {
    "LLM": home(SURFACE["LLM.__init__"], "tensorrt_llm"),
    "SamplingParams": home(SURFACE["SamplingParams"], "tensorrt_llm"),
    "GuidedDecodingParams": home(SURFACE["GuidedDecodingParams"], "tensorrt_llm.llmapi"),
    "KvCacheConfig": home(SURFACE["KvCacheConfig"], "tensorrt_llm.llmapi"),
    "CudaGraphConfig": home(SURFACE["CudaGraphConfig"], "tensorrt_llm.llmapi"),
}

LLM_PARAMS = params(
    SURFACE["LLM.__init__"]["BaseLlmArgs_fields"], SURFACE["LLM.__init__"]["TorchLlmArgs_fields"]
)
GENERATE_ASYNC_PARAMS = params(SURFACE["LLM.generate_async"]["params"])
PROMPT_KEYS = SURFACE["PromptInputs_dict_keys"]
OUTPUT_ATTRS = [bare_name(a) for a in SURFACE["RequestOutput"]["attributes"]]
NESTED = {"kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig}


def check_prompt(inputs: Any) -> dict[str, Any]:
    """A PromptInputs value: a str, or a TextPrompt/TokensPrompt dict with only its keys."""
    if isinstance(inputs, str):
        return {"prompt": inputs}
    if not isinstance(inputs, dict):
        raise ContractError(f"inputs must be a str or a prompt dict, got {type(inputs).__name__}")
    kind = "TextPrompt" if "prompt" in inputs else "TokensPrompt"
    if kind == "TokensPrompt" and "prompt_token_ids" not in inputs:
        raise ContractError(f"a prompt dict needs 'prompt' or 'prompt_token_ids': {sorted(inputs)}")
    unknown = sorted(set(inputs) - set(PROMPT_KEYS[kind]))
    if unknown:
        raise ContractError(f"{kind} has no key(s) {unknown}; allowed: {PROMPT_KEYS[kind]}")
    return inputs


def images_of(inputs: dict[str, Any]) -> list[Any]:
    """The images of ``multi_modal_data`` (only images are modelled here), checked to be PIL."""
    mm = inputs.get("multi_modal_data") or {}
    if not isinstance(mm, dict) or set(mm) - {"image"}:
        raise ContractError(f"multi_modal_data must be {{'image': [...]}}, got {mm!r}")
    images = mm.get("image") or []
    if not isinstance(images, list):
        raise ContractError("multi_modal_data['image'] must be a list of images")
    for img in images:
        if not (hasattr(img, "size") and hasattr(img, "tobytes") and hasattr(img, "mode")):
            raise ContractError(f"not an image: {type(img).__name__}")
    return images


PROCESSOR_RESERVED = set(
    SURFACE["Qwen2_5_VL_model_registration"]["mm_processor_kwargs"]["reserved"]
)
PROCESSOR_MIN_PIXELS = 56 * 56  # Qwen2.5-VL's preprocessor_config.json
PROCESSOR_MAX_PIXELS = 12845056


def processor_pixel_bounds(model: Any) -> tuple[int, int]:
    """The HF processor's own (min_pixels, max_pixels): a model dir's preprocessor_config.json,
    else Qwen2.5-VL's defaults."""
    path = Path(str(model)) / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return (
        int(config.get("min_pixels", PROCESSOR_MIN_PIXELS)),
        int(config.get("max_pixels", PROCESSOR_MAX_PIXELS)),
    )


def processed_images(
    images: list[Any], inputs: dict[str, Any], bounds: tuple[int, int] | None = None
) -> list[Any]:
    """The images as upstream's Qwen2-VL input processor hands them to the model: the HF
    processor is called with ``**mm_processor_kwargs`` and, unless ``do_resize`` is False,
    smart-resizes each image to its own pixel bounds (so a small image is upsized)."""
    kwargs = inputs.get("mm_processor_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ContractError(f"mm_processor_kwargs must be a dict, got {type(kwargs).__name__}")
    doubled = sorted(set(kwargs) & PROCESSOR_RESERVED)
    if doubled:
        raise ContractError(f"processor() got multiple values for keyword argument(s) {doubled}")
    if kwargs.get("do_resize", True) is False:
        return images
    low, high = bounds or (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
    out = []
    for img in images:
        w, h = img.size
        h2, w2 = smart_resize(h, w, low, high)
        out.append(img if (w2, h2) == (w, h) else img.resize((w2, h2)))
    return out


def check_hash_path_count(raw: list[Any], processed: list[Any], bounds: tuple[int, int]) -> None:
    """Upstream's multimodal-hash wrapper (R12): it counts each image's tokens by smart_resize
    with the processor's own bounds, blind to mm_processor_kwargs, and asserts that the
    processed prompt holds that many image tokens (``find_mm_token_positions``)."""
    expected = sum(
        (h // PATCH) * (w // PATCH)
        for h, w in (smart_resize(img.size[1], img.size[0], *bounds) for img in raw)
    )
    found = sum(max(1, (img.size[0] // PATCH) * (img.size[1] // PATCH)) for img in processed)
    if found != expected:
        raise AssertionError(
            f"stand-in hash path: {found} image token position(s) in the prompt, but "
            f"get_num_tokens_per_image counted {expected} (processor bounds {bounds})"
        )


def smart_resize(h: int, w: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule (transformers' image processor): multiples of 28 within the bounds."""
    import math

    hb, wb = round(h / PATCH) * PATCH or PATCH, round(w / PATCH) * PATCH or PATCH
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(PATCH, math.floor(h / beta / PATCH) * PATCH)
        wb = max(PATCH, math.floor(w / beta / PATCH) * PATCH)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / PATCH) * PATCH, math.ceil(w * beta / PATCH) * PATCH
    return hb, wb


def read_model_config(model: Any) -> dict[str, Any]:
    path = Path(str(model)) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class ToyTokenizer:
    """Whitespace words and ``<|...|>`` specials; each image pad expands to its vision tokens."""

    def __init__(self, image_token_id: int, vocab: int):
        self.image_token_id = image_token_id
        self.vocab = vocab

    def word_id(self, word: str) -> int:
        wid = 16 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % (
            self.vocab - 16
        )
        return wid + 1 if wid == self.image_token_id else wid

    def encode(self, text: str, images: list[Any]) -> list[int]:
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ContractError(
                f"prompt has {len(pieces) - 1} {IMAGE_PAD} placeholder(s) "
                f"for {len(images)} image(s)"
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids.extend(
                self.word_id(w) for w in piece.replace("<|", " <|").replace("|>", "|> ").split()
            )
            if i < len(images):
                w, h = images[i].size
                ids.extend([self.image_token_id] * max(1, (w // PATCH) * (h // PATCH)))
        return ids


def fake_completion(prompt: str, images: list[Any], sampling: Any, tokenizer: ToyTokenizer):
    """Deterministic output from the prompt, the image pixels and the seed; honours max_tokens."""
    digest = hashlib.sha256(prompt.encode())
    for img in images:
        digest.update(img.tobytes())
    digest.update(str(sampling.seed).encode())
    raw = digest.digest()
    wanted = 3 + raw[0] % 14
    n = min(wanted, int(sampling.max_tokens))
    words = [WORDS[b % len(WORDS)] for b in raw[1 : 1 + n]]
    return CompletionOutput(
        index=0,
        text=" ".join(words),
        token_ids=[tokenizer.word_id(w) for w in words],
        finish_reason="stop" if wanted <= sampling.max_tokens else "length",
    )


class StubBlocked(TimeoutError):
    """Raised when a call that TensorRT-LLM 1.2 blocks forever gave up after ``block_s``."""


OOM_MESSAGE = (  # torch's text for a CUDA OOM, as a worker's RequestError carries it
    "CUDA out of memory. Tried to allocate 2.31 GiB. GPU 0 has a total capacity of 79.10 GiB "
    "of which 1.07 GiB is free. Including non-PyTorch memory, this process has 78.02 GiB memory "
    "in use. Of the allocated memory 74.65 GiB is allocated by PyTorch, and 2.48 GiB is reserved "
    "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation "
    "for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
STEP_ERROR_MESSAGE = (
    "Encountered an error in forward function: CUDA error: an illegal memory access was encountered"
)
_OOM_SEEN: set[str] = set()  # oom_once: shas that already failed once in this process


class RequestOutput:
    """A request in flight, as upstream's GenerationResult: ``aresult()`` (when submitted from a
    thread with a running event loop), ``result()``, ``abort()``, ``finished``. Its attributes
    come from the JSON and are filled when the stand-in's scheduler finishes it. Reading the
    first response runs the executor's background-error handler, as result.py does."""

    def __init__(self, llm: LLM, **values: Any):
        for name in OUTPUT_ATTRS:
            setattr(self, name, values.pop(name, None))
        if values:
            raise AssertionError(f"stand-in bug: RequestOutput has no {sorted(values)}")
        self._llm = llm
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._aborted = False
        self._cancel_requested = False  # the worker got this request's cancel
        self._handled = False
        try:  # as GenerationResultBase: an async queue only if a loop runs in this thread
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._future: asyncio.Future | None = self._loop.create_future()
        except RuntimeError:
            self._loop = self._future = None

    def _finish(self, error: BaseException | None = None) -> None:
        """From the stand-in's scheduler thread: the final response arrives."""
        if self._done.is_set():
            return
        self._error = error
        self.finished = True
        self._done.set()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _resolve(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def _outcome(self) -> RequestOutput:
        if not self._handled:  # result.py's _handle_response: a queued background error first
            self._handled = True
            self._llm._executor_of_record._handle_background_error()
        if self._error is not None:
            raise self._error
        return self

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError("request not finished")
        return self._outcome()

    async def aresult(self) -> RequestOutput:
        if self._future is None:
            raise AssertionError(
                "The asyncio event loop was not present during initialization, "
                "so async operations are not available."
            )
        await asyncio.shield(self._future)  # a cancelled wait leaves the request running
        return self._outcome()

    def abort(self) -> None:
        self._llm._executor_of_record.abort_request(self)  # may block: a send to a dead worker
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted


class StubBehaviour:
    """How the stand-in runs, from the JSON in env ``TRTLLM_STUB`` (tests set it; every key
    optional). Timing: ``step_s`` per scheduler step (one answer word per step, so requests
    finish out of order); ``submit_cpu_s`` inside ``generate_async``; ``stats_dir`` where each
    process writes what it saw (with ``worker_pid``). Faults by the sha256 of an image's pixels:
    ``hang`` (never finishes unless aborted); ``crash`` (the whole actor process dies: SIGKILL
    of the caller); ``fail`` (RequestError at the end); ``oom`` (that request alone fails with a
    CUDA OOM RequestError each time it runs), ``oom_once`` (only its first run per process);
    ``step_error`` (its step fails every running request with RequestError
    ``step_error_message``; the executor keeps looping; ``sticky``, default false: every later
    step fails too); ``kill_worker`` (SIGKILLs the worker child). ``die_after`` N submissions: a
    background error (once per ``die_once`` marker file); ``kill_worker_after`` N: the worker
    child is SIGKILLed (once per ``kill_once`` marker file), as the kernel's OOM killer would.
    Switches of 1.2's harshness, on by default: ``dead_blocks`` (abort, shutdown and
    generate_async block while the worker is dead, forever, or ``block_s`` then StubBlocked),
    ``hash_check`` (the multimodal-hash token count); off by default: ``answer_aborted_waiting``
    (an aborted waiting request answers 'cancelled'). ``worker_max_s`` (default 600) ends an
    orphaned worker child: test hygiene, not upstream."""

    def __init__(self) -> None:
        spec = json.loads(os.environ.get("TRTLLM_STUB") or "{}")
        self.step_s = float(spec.get("step_s", 0.001))
        self.submit_cpu_s = float(spec.get("submit_cpu_s", 0.0))
        self.stats_dir = spec.get("stats_dir")
        self.hang = set(spec.get("hang", []))
        self.crash = set(spec.get("crash", []))
        self.fail = set(spec.get("fail", []))
        self.oom = set(spec.get("oom", []))
        self.oom_once = set(spec.get("oom_once", []))
        self.step_error = set(spec.get("step_error", []))
        self.step_error_message = str(spec.get("step_error_message", STEP_ERROR_MESSAGE))
        self.sticky = bool(spec.get("sticky", False))
        self.kill_worker = set(spec.get("kill_worker", []))
        self.die_after = int(spec.get("die_after", 0))
        self.die_once = spec.get("die_once")
        self.kill_worker_after = int(spec.get("kill_worker_after", 0))
        self.kill_once = spec.get("kill_once")
        self.dead_blocks = bool(spec.get("dead_blocks", True))
        block_s = spec.get("block_s")
        self.block_s = None if block_s is None else float(block_s)
        self.hash_check = bool(spec.get("hash_check", True))
        self.answer_aborted_waiting = bool(spec.get("answer_aborted_waiting", False))
        self.worker_max_s = float(spec.get("worker_max_s", 600))


def pixels_sha256(images: list[Any]) -> str:
    digest = hashlib.sha256()
    for img in images:
        digest.update(img.tobytes())
    return digest.hexdigest()


# The MPI worker's stand-in: a child that only sleeps. No parent-death signal, own stdio closed,
# so it outlives a parent that dies (upstream 1.2's orphan, R15); it ends after worker_max_s.
WORKER_CODE = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\n" + (
    "while time.monotonic() < end:\n    time.sleep(0.5)\n"
)


class Executor:
    """Stand-in ``GenerationExecutorProxy`` (``llm._executor``): ``is_shutdown()`` returns
    ``doing_shutdown``, set at the start of ``pre_shutdown`` before any blocking wait; a
    background error waits in ``_error_queue`` until the next submit or response raises it
    after ``shutdown()``. Its worker is a real child process (``worker_pid``)."""

    def __init__(self, llm: LLM):
        self._llm = llm
        self.doing_shutdown = False
        self._error_queue: queue.Queue[BaseException] = queue.Queue()
        self._finished = False
        self.worker = subprocess.Popen(
            [sys.executable, "-S", "-c", WORKER_CODE, str(llm.behaviour.worker_max_s)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=False,
        )

    def is_shutdown(self) -> bool:
        return self.doing_shutdown

    def worker_dead(self) -> bool:
        return self.worker.poll() is not None

    def block_if_dead(self, what: str) -> bool:
        """A blocking ZeroMQ send / MPI future wait with no live worker: never returns (or
        raises StubBlocked after ``block_s``). True if the worker is dead and nothing blocks."""
        if not self.worker_dead():
            return False
        behaviour = self._llm.behaviour
        if not behaviour.dead_blocks:
            return True
        if behaviour.block_s is None:
            threading.Event().wait()  # forever, as on 1.2
        time.sleep(behaviour.block_s)
        raise StubBlocked(f"stand-in: {what} blocked {behaviour.block_s}s on a dead worker")

    def abort_request(self, output: RequestOutput) -> None:
        if self._finished:
            return
        if self.block_if_dead("abort()"):
            return  # the cancel goes nowhere
        self._llm._abort(output)

    def _handle_background_error(self) -> None:
        """As upstream: the first queued error is raised after a (maybe blocking) shutdown."""
        try:
            error = self._error_queue.get_nowait()
        except queue.Empty:
            return
        self.shutdown()
        raise error

    def pre_shutdown(self) -> None:
        if self.doing_shutdown:
            return
        self.doing_shutdown = True
        for output in self._llm._pending():  # _abort_all_requests: a send each
            self.abort_request(output)

    def shutdown(self) -> None:
        if self._finished:
            return
        self.pre_shutdown()
        self.block_if_dead("shutdown()")  # f.result() on the worker's MPI future
        self._finished = True
        self._llm._stop_scheduler()
        if self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(5)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


class LLM(KwOnly):
    """Stand-in ``tensorrt_llm.LLM``: checks every call against the JSON, generates on the CPU.

    Behaves like the engine where the runner depends on it: requests batch in flight (up to
    ``max_batch_size`` run, the rest wait and join as slots free), each takes one scheduler step
    per answer token, so they finish out of submission order; ``generate_async`` runs its input
    processing in the caller's thread and fails (ContractError) if two threads are inside it at
    once, as upstream's unlocked submit path can corrupt its state; results of requests submitted
    from an event loop's thread support ``await aresult()``; faults per :class:`StubBehaviour`.
    """

    PARAMS = LLM_PARAMS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for name, cls in NESTED.items():
            value = self.passed_kwargs.get(name)
            if isinstance(value, dict):
                value = cls(**value)
            if value is not None and name in self.passed_kwargs and not isinstance(value, cls):
                raise ContractError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        config = read_model_config(self.model)
        image_id = config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)
        self.tokenizer = ToyTokenizer(image_id, config.get("vocab_size", DEFAULT_VOCAB))
        self.pixel_bounds = processor_pixel_bounds(self.model)
        self.behaviour = StubBehaviour()
        self.shutdown_calls = 0
        self.submitted = 0
        self.submit_threads: set[int] = set()
        self.violations = 0
        self.peak_in_flight = 0
        self.peak_running = 0
        self._entry = threading.Lock()
        self._inside = False
        self._cond = threading.Condition()
        self._waiting: list[list] = []  # [output, steps left, pixels sha]
        self._running: list[list] = []
        self._stopping = False
        self._dying = False  # a background error: one response in flight, then no progress
        self._dead: BaseException | None = None  # that error (tests read it)
        self._poisoned = False  # a sticky step error happened
        # Upstream's executor (private, but the runner reads it); None after shutdown() returns.
        self._executor: Executor | None = Executor(self)
        self._executor_of_record = self._executor  # the stand-in's own reference, never None
        # Stand-in only (no such attribute upstream): the pid of the worker child process.
        self.worker_pid = self._executor.worker.pid
        atexit.register(_kill_worker_at_exit, self._executor.worker)
        self._write_stats()
        self._scheduler = threading.Thread(target=self._schedule, daemon=True)
        self._scheduler.start()

    # ---- submitting (the caller's thread) -----------------------------------------------
    def generate_async(self, *args: Any, **kwargs: Any) -> RequestOutput:
        with self._entry:
            if self._inside:
                self.violations += 1
                self._write_stats()
                raise ContractError(
                    "generate_async entered from two threads at once: upstream's submit path "
                    "(client ids, its ZeroMQ socket) is not thread-safe"
                )
            self._inside = True
        try:
            self.submit_threads.add(threading.get_ident())
            return self._generate_async(*args, **kwargs)
        finally:
            with self._entry:
                self._inside = False

    def _generate_async(self, *args: Any, **kwargs: Any) -> RequestOutput:
        call = bind("LLM.generate_async", GENERATE_ASYNC_PARAMS, args, kwargs)
        executor = self._executor
        if executor is None or executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        inputs = check_prompt(call["inputs"])
        sampling = call.get("sampling_params")
        if sampling is None:
            sampling = SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ContractError(f"sampling_params must be SamplingParams, got {type(sampling)}")
        if sampling.guided_decoding is not None and self.guided_decoding_backend is None:
            # The JSON's GuidedDecodingParams "requires": no backend, no guided decoder.
            raise ContractError("guided_decoding needs LLM(guided_decoding_backend=...)")
        raw_images = images_of(inputs)
        images = processed_images(raw_images, inputs, self.pixel_bounds)
        if raw_images and self.behaviour.hash_check:
            check_hash_path_count(raw_images, images, self.pixel_bounds)
        if self.behaviour.submit_cpu_s:
            time.sleep(self.behaviour.submit_cpu_s)  # the input processor's work, this thread
        prompt = inputs.get("prompt", "")
        ids = inputs.get("prompt_token_ids") or self.tokenizer.encode(prompt, images)
        completion = fake_completion(prompt, images, sampling, self.tokenizer)
        executor._handle_background_error()  # proxy.submit: before the request is sent
        executor.block_if_dead("generate_async()")  # the request queue's send
        output = RequestOutput(
            self,
            request_id=self.submitted + 1,
            prompt=prompt,
            prompt_token_ids=ids,
            outputs=[completion],
            finished=False,
        )
        sha = pixels_sha256(images)
        with self._cond:
            self.submitted += 1
            steps = max(1, len(completion.token_ids))
            self._waiting.append([output, steps, sha])
            in_flight = len(self._waiting) + len(self._running)
            self.peak_in_flight = max(self.peak_in_flight, in_flight)
            die = self.behaviour.die_after and self.submitted >= self.behaviour.die_after
            kill = self.behaviour.kill_worker_after
            kill = kill and self.submitted >= kill and not self._executor_of_record.worker_dead()
            self._cond.notify_all()
        self._write_stats()
        if die and not self._dying and self._claim_death(self.behaviour.die_once):
            self._die(RuntimeError("Executor worker died (stand-in: a background error)"))
        if kill and self._claim_death(self.behaviour.kill_once):
            self._executor_of_record.worker.kill()  # nothing tells the pending requests
            self._executor_of_record.worker.wait()
        return output

    def _claim_death(self, marker: str | None) -> bool:
        if not marker:
            return True
        try:
            with open(marker, "x"):
                return True
        except FileExistsError:
            return False

    # ---- the executor (its own thread) --------------------------------------------------
    def _pending(self) -> list[RequestOutput]:
        with self._cond:
            return [e[0] for e in self._waiting + self._running]

    def _schedule(self) -> None:
        slots = int(self.max_batch_size)
        executor = self._executor_of_record
        while True:
            with self._cond:
                while not (self._waiting or self._running) and not self._stopping:
                    self._cond.wait(0.05)
                    if executor.worker_dead():
                        return  # the worker is gone: no step ever runs again
                if self._stopping or executor.worker_dead():
                    return
                while self._waiting and len(self._running) < slots:
                    entry = self._waiting.pop(0)
                    self._running.append(entry)
                    if entry[2] in self.behaviour.crash:
                        os.kill(os.getpid(), signal.SIGKILL)  # the whole actor process dies
                    if entry[2] in self.behaviour.kill_worker:
                        executor.worker.kill()  # the worker child, not this process
                        executor.worker.wait()
                        return
                self.peak_running = max(self.peak_running, len(self._running))
            time.sleep(self.behaviour.step_s)
            with self._cond:
                if self._stopping or executor.worker_dead():
                    return
                if self._dying:  # one response was in flight when the worker failed
                    pending = self._running or self._waiting
                    finished = [(pending.pop(0)[0], None)] if pending else []
                    self._stopping = True
                else:
                    finished = self._step()
            for output, error in finished:
                output._finish(error)
            if self._dying:
                return

    def _step(self) -> list[tuple[RequestOutput, BaseException | None]]:
        """One iteration over the running requests (under ``_cond``): what finishes, and how."""
        behaviour = self.behaviour
        finished: list[tuple[RequestOutput, BaseException | None]] = []
        active = []
        for entry in self._running:
            if entry[0]._cancel_requested:
                entry[0].outputs[0].finish_reason = "cancelled"
                finished.append((entry[0], None))
            else:
                active.append(entry)
        if active and (self._poisoned or any(e[2] in behaviour.step_error for e in active)):
            self._poisoned = self._poisoned or behaviour.sticky
            message = behaviour.step_error_message
            finished += [(e[0], RequestError(message)) for e in active]  # _handle_errors: all
            self._running = []
            return finished
        still = []
        for entry in active:
            output, steps, sha = entry
            if sha in behaviour.oom or (sha in behaviour.oom_once and sha not in _OOM_SEEN):
                _OOM_SEEN.add(sha)
                finished.append((output, RequestError(OOM_MESSAGE)))
                continue
            if sha in behaviour.hang:
                still.append(entry)  # never finishes unless aborted
                continue
            entry[1] = steps - 1
            if entry[1] > 0:
                still.append(entry)
            elif sha in behaviour.fail:
                finished.append((output, RequestError("stand-in: the request failed")))
            else:
                finished.append((output, None))
        self._running = still
        return finished

    def _abort(self, output: RequestOutput) -> None:
        """The worker handles a cancel: a waiting request is dropped without an answer (as
        PyExecutor's update_waiting_queue); a running one answers 'cancelled' next step."""
        answer = False
        with self._cond:
            if self._dying:
                return  # the failed worker handles no cancel
            for entry in list(self._waiting):
                if entry[0] is output:
                    self._waiting.remove(entry)
                    answer = self.behaviour.answer_aborted_waiting
            output._cancel_requested = True
            self._cond.notify_all()
        if answer:
            output.outputs[0].finish_reason = "cancelled"
            output._finish()

    def _die(self, error: BaseException) -> None:
        """A background error (1.2 path c): queued for the next submit or response."""
        with self._cond:
            self._dying = True
            self._dead = error
            self._cond.notify_all()
        self._executor_of_record._error_queue.put(error)

    def _stop_scheduler(self) -> None:
        """The executor quits (healthy shutdown): running requests answer 'cancelled'."""
        with self._cond:
            self._stopping = True
            running = [e[0] for e in self._running if not e[0].finished]
            self._waiting, self._running = [], []
            self._cond.notify_all()
        for output in running:
            if output._cancel_requested:
                output.outputs[0].finish_reason = "cancelled"
                output._finish()
        if self._scheduler is not threading.current_thread():
            self._scheduler.join(timeout=5)

    def _write_stats(self) -> None:
        folder = self.behaviour.stats_dir
        if not folder:
            return
        stats = {
            "pid": os.getpid(),
            "worker_pid": self.worker_pid,
            "submitted": self.submitted,
            "submit_threads": len(self.submit_threads),
            "violations": self.violations,
            "peak_in_flight": self.peak_in_flight,
            "peak_running": self.peak_running,
            "max_batch_size": int(self.max_batch_size),
        }
        path = Path(folder) / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(path)

    def shutdown(self) -> None:
        """As upstream: the executor's shutdown (which may block), then ``_executor = None``."""
        self.shutdown_calls += 1
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def _kill_worker_at_exit(worker: subprocess.Popen) -> None:
    """Interpreter exit without shutdown(): end the worker child (test hygiene; upstream's
    atexit shutdown would do so, or block on a dead worker). os._exit and SIGKILL skip this."""
    if worker.poll() is None:
        worker.kill()
        worker.wait()
