"""Builds the stand-in API from ``tests/data/trtllm_api_surface.json`` (see the package docstring).

Every class accepts exactly the keyword names that file lists for it (REQUIRED ones required) and
rejects any other, as TensorRT-LLM's pydantic args (extra='forbid') and kw-only dataclasses do.
Nothing here is hand-written per field: a name added to or removed from the JSON changes what the
stand-in accepts.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import signal
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


def processed_images(images: list[Any], inputs: dict[str, Any]) -> list[Any]:
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
    out = []
    for img in images:
        w, h = img.size
        h2, w2 = smart_resize(h, w, PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
        out.append(img if (w2, h2) == (w, h) else img.resize((w2, h2)))
    return out


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


class RequestOutput:
    """A request in flight, as upstream's GenerationResult: ``aresult()`` (when submitted from a
    thread with a running event loop), ``result()``, ``abort()``, ``finished``. Its attributes
    come from the JSON and are filled when the stand-in's scheduler finishes it."""

    def __init__(self, llm: LLM, **values: Any):
        for name in OUTPUT_ATTRS:
            setattr(self, name, values.pop(name, None))
        if values:
            raise AssertionError(f"stand-in bug: RequestOutput has no {sorted(values)}")
        self._llm = llm
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._aborted = False
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
        self._aborted = True
        self._llm._abort(self)

    def aborted(self) -> bool:
        return self._aborted


class StubBehaviour:
    """How the stand-in runs, from the JSON in env ``TRTLLM_STUB`` (tests set it; every key
    optional): ``step_s`` per scheduler step (each answer word is one step, so requests finish
    out of submission order); ``submit_cpu_s`` of work inside ``generate_async`` (its input
    processor's CPU time); ``stats_dir`` to write what each process saw; faults by the sha256
    of an image's pixels: ``hang`` (never finishes unless aborted), ``crash`` (SIGKILLs the
    process when it starts running), ``fail`` (RequestError); ``die_after`` N submissions, the
    executor dies (a background error, then "LLM is shutting down"), once per ``die_once``
    marker file."""

    def __init__(self) -> None:
        spec = json.loads(os.environ.get("TRTLLM_STUB") or "{}")
        self.step_s = float(spec.get("step_s", 0.001))
        self.submit_cpu_s = float(spec.get("submit_cpu_s", 0.0))
        self.stats_dir = spec.get("stats_dir")
        self.hang = set(spec.get("hang", []))
        self.crash = set(spec.get("crash", []))
        self.fail = set(spec.get("fail", []))
        self.die_after = int(spec.get("die_after", 0))
        self.die_once = spec.get("die_once")


def pixels_sha256(images: list[Any]) -> str:
    digest = hashlib.sha256()
    for img in images:
        digest.update(img.tobytes())
    return digest.hexdigest()


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
        self.behaviour = StubBehaviour()
        self.shutdown_calls = 0
        self.submitted = 0
        self.submit_threads: set[int] = set()
        self.violations = 0
        self.peak_in_flight = 0
        self.peak_running = 0
        self._entry = threading.Lock()
        self._inside = False
        self._dead: BaseException | None = None
        self._cond = threading.Condition()
        self._waiting: list[list] = []  # [output, steps left, pixels sha]
        self._running: list[list] = []
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
        if self.shutdown_calls or self._dead is not None:
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
        images = processed_images(images_of(inputs), inputs)
        if self.behaviour.submit_cpu_s:
            time.sleep(self.behaviour.submit_cpu_s)  # the input processor's work, this thread
        prompt = inputs.get("prompt", "")
        ids = inputs.get("prompt_token_ids") or self.tokenizer.encode(prompt, images)
        completion = fake_completion(prompt, images, sampling, self.tokenizer)
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
            self._cond.notify_all()
        self._write_stats()
        if die and self._claim_death():
            self._die(RuntimeError("Executor worker died (stand-in: a background error)"))
        return output

    def _claim_death(self) -> bool:
        marker = self.behaviour.die_once
        if not marker:
            return True
        try:
            with open(marker, "x"):
                return True
        except FileExistsError:
            return False

    # ---- the executor (its own thread) --------------------------------------------------
    def _schedule(self) -> None:
        slots = int(self.max_batch_size)
        while True:
            with self._cond:
                while not (self._waiting or self._running) and not self.shutdown_calls:
                    self._cond.wait()
                if self.shutdown_calls and not (self._waiting or self._running):
                    return
                while self._waiting and len(self._running) < slots:
                    entry = self._waiting.pop(0)
                    self._running.append(entry)
                    if entry[2] in self.behaviour.crash:
                        os.kill(os.getpid(), signal.SIGKILL)  # a poison request kills us
                self.peak_running = max(self.peak_running, len(self._running))
            time.sleep(self.behaviour.step_s)
            finished: list[tuple[RequestOutput, BaseException | None]] = []
            with self._cond:
                still = []
                for entry in self._running:
                    output, steps, sha = entry
                    if output._aborted:
                        output.outputs[0].finish_reason = "cancelled"
                        finished.append((output, None))
                        continue
                    if sha in self.behaviour.hang:
                        still.append(entry)  # never finishes unless aborted
                        continue
                    entry[1] = steps - 1
                    if entry[1] > 0:
                        still.append(entry)
                    elif sha in self.behaviour.fail:
                        finished.append((output, RequestError("stand-in: the request failed")))
                    else:
                        finished.append((output, None))
                self._running = still
            for output, error in finished:
                output._finish(error)

    def _abort(self, output: RequestOutput) -> None:
        with self._cond:
            for queue in (self._waiting,):
                for entry in list(queue):
                    if entry[0] is output:
                        queue.remove(entry)
                        output.outputs[0].finish_reason = "cancelled"
                        output._finish()
            self._cond.notify_all()

    def _die(self, error: BaseException) -> None:
        """A background error: every pending request raises it, later submits are refused."""
        with self._cond:
            self._dead = error
            pending = [e[0] for e in self._waiting + self._running]
            self._waiting, self._running = [], []
        for output in pending:
            output._finish(error)

    def _write_stats(self) -> None:
        folder = self.behaviour.stats_dir
        if not folder:
            return
        stats = {
            "pid": os.getpid(),
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
        with self._cond:
            self.shutdown_calls += 1
            pending = [e[0] for e in self._waiting + self._running]
            self._waiting, self._running = [], []
            self._cond.notify_all()
        for output in pending:  # upstream aborts what is pending before its workers quit
            output.outputs[0].finish_reason = "cancelled"
            output._finish()
