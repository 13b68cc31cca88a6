"""transformers engine: the reference implementation of Qwen2.5-VL inference (CPU and GPU).

One ``model.generate`` call per batch: the model directory's own chat template and tokenizer,
left padding. Images arrive already on the 28-pixel grid; ``engine.hf.preprocess`` says where
they become pixel values: ``device`` (default; torch on the model's device, see ``hf_inputs``)
or ``processor`` (the model's transformers image processor, numpy on the CPU, told not to resize).
Both give the same tensors.

Config (``engine.*``):

* ``model``: a model directory, or an fsspec URL of one (copied once per machine into
  ``$QVL_BATCH_MODEL_CACHE`` or ``~/.cache/qvl-batch/models``).
* ``dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU. ``device``: auto | cpu | cuda[:n].
* ``hf.attn_implementation`` (falls back to ``eager`` if the model or install refuses it),
  ``hf.trust_remote_code``.
* ``options``: extra keyword arguments for the model's ``from_pretrained`` (e.g.
  ``{"revision": ...}``), except two reserved keys: ``processor_kwargs`` (a dict for
  ``AutoProcessor.from_pretrained``, e.g. ``{"use_fast": false}`` on 4.x or ``{"backend": "pil"}``
  on 5.x) and ``storage_options`` (a dict for fsspec when ``model`` is a URL).

Sampling: ``temperature == 0`` is greedy; otherwise temperature / top_p / top_k (0 = off) /
repetition_penalty. The model's ``generation_config.json`` sampling defaults are NOT used: the job's
``sampling`` section is the whole truth. ``torch.manual_seed(seed)`` runs before every batch, so a
sampled row's text depends on which rows shared its batch and in what order. Greedy output depends
on batching only through float rounding: in float32 a left-padded batch matches row-by-row
generation exactly (CPU tests; a random 3B on an H200), in bfloat16 the kernels chosen per batch
shape can flip a near-tied argmax and the texts diverge from there.

Rows whose prompt leaves no room under the model's ``max_position_embeddings`` get ENGINE_ERROR;
rows that would run past it stop there with finish_reason "length". Anything else that fails raises
from ``generate`` and the actor splits the batch to isolate the row.

Guided decoding (``structured.json_schema`` set, ``structured.guided`` not ``off``): xgrammar
(the ``hf`` extra) compiles the schema once per engine against the tokenizer, padded to the
model's vocabulary, with the engine's EOS ids as its stop tokens; every ``generate`` call gets a
fresh :class:`GrammarLogitsProcessor` that masks each row's next-token scores to what the grammar
allows (before temperature / top-k / top-p), so an answer is one-line JSON in the schema's
property order and can end only where the JSON is complete. A row cut by ``max_tokens`` still ends
unfinished (finish_reason "length"). xgrammar does not enforce ``uniqueItems`` (0.2.8); the
parser catches such rows. Without xgrammar, ``auto`` warns once and generates freely
(``engine.guided`` False), ``required`` refuses to build the engine.

Stage clocks: ``stage_times()`` holds ``inputs`` (on the model's path), ``ahead`` (host inputs
prepared while the previous batch ran), ``generate``, ``outputs`` and, inside generate,
``vision`` (the vision tower's forward), ``prefill`` (the first forward, vision included, up to
the first token's logits) and ``decode`` (the rest); ``last_stages()`` the last batch's figures.
See :class:`StageClock` (CUDA events, no host sync in the decode loop).

Benchmark answer lengths (``engine.hf.answer_lengths``, off by default): a random-weight model
never emits EOS, so each row's answer ends at a length drawn from its id
(:func:`qvl_batch.engines.lengths.answer_length`, as the fake engine's) by a per-row stopping
criterion; the batch runs until its longest row ends, its finished rows padded. Such a row is
finish_reason "stop" with its drawn length (one whose drawn length passes max_tokens: "length").

Compiled decode (``engine.hf.compile``): static KV caches and a compiled decode step, in shapes
that come in steps (batch-size rungs, cache lengths in steps of 128 tokens), one graph per shape
met, the caches within a memory cap (``engine.hf.static_cache_gib``): see ``hf_decode``. The
prefill runs eagerly, as transformers does. Greedy float32 output equals eager token for token
(CPU tests).

Dense vision (``engine.hf.vision: dense``): the vision tower's window and full attention run as
a few batched calls (``hf_vision.py``); ``stock`` is transformers' one call per window and image.

Grouped decode attention (``engine.hf.decode_attention: grouped``): in a decode step each KV
head's query heads attend as its queries, with no per-step copy of the cache out to every query
head (``hf_gqa.py``); ``stock`` is transformers' SDPA function.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from ..config import Config, SamplingConfig, StructuredConfig
from ..errors import RowError
from ..rows.prompts import chat_messages
from .base import BatchEngine, Request, Result
from .hf_decode import (
    StaticCaches,
    batch_rungs,
    check_compile_supported,
    compile_supported,
    default_cap,
    static_cache_len,
)
from .hf_inputs import HostImages, ImageInputs, expand_placeholders
from .hf_vision import vision_tower
from .lengths import answer_length

log = logging.getLogger(__name__)

XGRAMMAR_HINT = "pip install xgrammar (it is in the hf extra: pip install 'qvl-batch[hf]')"

PATCH = 14  # vision patch side; merge 2x2 -> one token per 28x28
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def local_model_dir(model: str, storage_options: dict | None = None) -> str:
    """A local directory for ``model``: itself, or a once-per-machine copy of an fsspec URL."""
    if "://" not in model or model.startswith("file://"):
        return model.removeprefix("file://")
    import fsspec

    root = Path(os.environ.get("QVL_BATCH_MODEL_CACHE", Path.home() / ".cache/qvl-batch/models"))
    target = root / hashlib.sha256(model.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        fs, path = fsspec.core.url_to_fs(model, **(storage_options or {}))
        fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        (tmp / ".complete").write_text(model + "\n")
        try:
            tmp.rename(target)  # atomic; another actor may have won the race
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_processor(path: str, trust_remote_code: bool = False, **kwargs: Any):
    """``AutoProcessor.from_pretrained``, or, without torchvision, the same processor class built
    from its image processor and tokenizer with no video processor.

    Both transformers 4.57 and 5.x refuse to load Qwen2.5-VL's processor without torchvision
    (its video processor needs it), though images go through a PIL/numpy image processor fine.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    image_processor = AutoImageProcessor.from_pretrained(
        path, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    base = _processor_class(path)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__
    template = _read_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return ImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
    )


def _processor_class(path: str) -> type:
    """The processor class a model directory names (Qwen2_5_VLProcessor if it names none)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json"):
        if Path(path, fname).is_file():
            name = name or json.loads(Path(path, fname).read_text()).get("processor_class")
    if name is None and Path(path, "config.json").is_file():
        model_type = json.loads(Path(path, "config.json").read_text()).get("model_type")
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name or "", None) or transformers.Qwen2_5_VLProcessor


def _read_chat_template(path: str) -> str | None:
    jinja, js = Path(path, "chat_template.jinja"), Path(path, "chat_template.json")
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def generation_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """The job's sampling section as ``GenerationConfig`` fields."""
    kw: dict[str, Any] = {"repetition_penalty": sampling.repetition_penalty, "num_beams": 1}
    if sampling.temperature == 0:
        return {**kw, "do_sample": False}
    return {
        **kw,
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or None,
    }


class GrammarLogitsProcessor(transformers.LogitsProcessor):
    """Masks each row's next-token scores to the tokens its grammar matcher allows.

    One per ``generate`` call (matchers carry per-row state). Rows are left-padded, so every
    row's generated tokens start at the same column; a row whose matcher has accepted a stop
    token is finished (transformers pads it from then on) and left unmasked.
    """

    def __init__(
        self,
        xgr: Any,
        compiled: Any,
        batch_size: int,
        vocab_size: int,
        lengths: list[int] | None = None,
    ):
        self._xgr = xgr
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
        self.vocab_size = vocab_size
        self.prompt_len: int | None = None
        self.accepted = [0] * batch_size  # generated tokens each matcher has consumed
        # Rows a stopping criterion ends after this many tokens (then padded, like a finished row)
        self.lengths = lengths

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        start = min(self.accepted)  # only the tokens not yet seen cross to the CPU
        new = input_ids[:, self.prompt_len + start :].tolist()
        for i, matcher in enumerate(self.matchers):
            ended = self.lengths is not None and self.accepted[i] >= self.lengths[i]
            unseen = new[i][self.accepted[i] - start :]
            if self.lengths is not None:
                unseen = unseen[: max(0, self.lengths[i] - self.accepted[i])]
            for token in unseen:
                if matcher.is_terminated():
                    break  # after its stop token a finished row only gets padding
                if not matcher.accept_token(token):
                    raise RuntimeError(f"row {i}: the JSON grammar refused token {token}")
            self.accepted[i] = start + len(new[i])
            if ended or matcher.is_terminated():
                self.bitmask[i].fill_(-1)  # all allowed: the row's token is discarded anyway
            else:
                matcher.fill_next_token_bitmask(self.bitmask, i)
        on = scores.device.type if scores.device.type in ("cpu", "cuda") else "cpu"
        masked = scores.to(on)
        self._xgr.apply_token_bitmask_inplace(
            masked, self.bitmask.to(on), vocab_size=self.vocab_size
        )
        return masked.to(scores.device)


class JsonSchemaGuide:
    """A JSON schema compiled once (xgrammar) for one tokenizer and vocabulary."""

    def __init__(
        self, xgr: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int], schema: dict
    ):
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
        )
        # One-line JSON with ", " and ": " separators and no other whitespace: a model cannot
        # pad its answer with blanks until max_tokens, and the answer's length is bounded.
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(schema), any_whitespace=False
        )

    def processor(
        self, batch_size: int, lengths: list[int] | None = None
    ) -> GrammarLogitsProcessor:
        """A fresh processor for one ``generate`` call over ``batch_size`` rows (``lengths``:
        where a stopping criterion ends each row, if one does)."""
        return GrammarLogitsProcessor(
            self._xgr, self.compiled, batch_size, self.vocab_size, lengths
        )


@functools.lru_cache(maxsize=1)
def _warn_unguided(reason: str) -> None:
    log.warning(
        "structured.guided=auto: answers are generated freely and parsed after (%s); for "
        "guided decoding with the hf engine: %s",
        reason,
        XGRAMMAR_HINT,
    )


def import_xgrammar(structured: StructuredConfig) -> Any | None:
    """xgrammar when the job asks for guided decoding, else None (free generation).

    Checked before the model loads: ``required`` without xgrammar raises, ``auto`` warns once.
    """
    if structured.json_schema is None or structured.guided == "off":
        return None
    try:
        import xgrammar
    except ImportError as exc:
        if structured.guided == "required":
            raise ImportError(
                "structured.guided=required: the hf engine constrains answers to the JSON schema "
                f"with xgrammar, which does not import ({exc}); {XGRAMMAR_HINT}"
            ) from exc
        _warn_unguided(f"xgrammar does not import: {exc}")
        return None
    return xgrammar


def make_guide(
    xgr: Any | None,
    structured: StructuredConfig,
    tokenizer: Any,
    vocab_size: int,
    stop_ids: list[int],
) -> JsonSchemaGuide | None:
    """The job's schema compiled by ``xgr``, or None (no xgrammar, or ``auto`` and a schema it
    cannot compile: warned, answers are generated freely)."""
    if xgr is None:
        return None
    try:
        return JsonSchemaGuide(xgr, tokenizer, vocab_size, stop_ids, structured.json_schema or {})
    except Exception as exc:  # e.g. a schema keyword this xgrammar cannot compile
        if structured.guided == "required":
            raise ValueError(f"structured.json_schema: xgrammar cannot compile it: {exc}") from exc
        _warn_unguided(f"xgrammar cannot compile the schema: {exc}")
        return None


class StageClock:
    """Splits one ``generate`` call into vision tower, prefill and decode seconds.

    Marks: ``start`` (before ``generate``), the vision tower's forward entry and exit (hooks),
    the first logits (:class:`FirstLogits`, the prefill's end) and ``end`` (``generate`` has
    returned). On CUDA a mark is a ``torch.cuda.Event`` recorded on the current stream, so the
    decode loop gets no host sync; the events are read in :meth:`split`, after the outputs were
    copied to the host (which waits for the GPU anyway). On CPU marks are ``time.perf_counter``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] | None = None  # None: not inside a timed generate
        self.vision: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.vision = []
        self.marks = {"start": self._mark()}

    def vision_enter(self, *_: Any) -> None:
        if self.marks is not None:
            self.vision.append((self._mark(), None))

    def vision_exit(self, *_: Any) -> None:
        if self.marks is not None and self.vision and self.vision[-1][1] is None:
            self.vision[-1] = (self.vision[-1][0], self._mark())

    def first_logits(self) -> None:
        if self.marks is not None and "first" not in self.marks:
            self.marks["first"] = self._mark()

    def stop(self) -> None:
        if self.marks is not None:
            self.marks["end"] = self._mark()

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def split(self) -> dict[str, float]:
        """``vision``, ``prefill`` (vision included) and ``decode`` seconds of the call."""
        marks, self.marks = self.marks or {}, None
        if "start" not in marks or "end" not in marks:
            return {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        if self.cuda:
            marks["end"].synchronize()
        first = marks.get("first", marks["end"])
        vision = sum(self._seconds(a, b) for a, b in self.vision if b is not None)
        return {
            "vision": vision,
            "prefill": self._seconds(marks["start"], first),
            "decode": self._seconds(first, marks["end"]),
        }


class FirstLogits(transformers.LogitsProcessor):
    """Leaves the scores as they are; its first call marks the prefill's end on the clock, and
    every call (one per step) is a sign of life for the actor's watchdog."""

    def __init__(self, clock: StageClock, alive):
        self.clock, self.alive = clock, alive

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.clock.first_logits()
        self.alive()
        return scores


class RowLengths(transformers.StoppingCriteria):
    """Ends each row once it has its own number of new tokens: a per-row bool tensor, computed
    on the device (no host sync). ``generate`` pads a finished row while the batch runs on until
    its longest row ends: what a lock-step engine pays for a long answer."""

    def __init__(self, prompt_width: int, lengths: list[int], device: torch.device):
        self.ends = torch.tensor([prompt_width + n for n in lengths], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.ends <= input_ids.shape[1]


@dataclass
class HostBatch:
    """``HFEngine.prepare``'s work: the rows that fit, the rows refused, their host inputs."""

    requests: list[Request]
    refused: list[Result]
    host: Any
    seconds: float


class HFEngine(BatchEngine):
    """Qwen2.5-VL through ``transformers``; one ``generate`` call per batch."""

    name = "hf"
    version = transformers.__version__

    def __init__(self, cfg: Config):
        from transformers import AutoModelForImageTextToText, GenerationConfig

        ecfg = cfg.engine
        self.sampling = cfg.sampling
        self.answer_lengths = ecfg.hf.answer_lengths  # "" = the model decides
        self._max_pixels = cfg.image.max_pixels
        self.compiled = bool(ecfg.hf.compile)  # None (auto) is decided once the device is known
        if self.compiled:
            check_compile_supported(transformers.__version__, 0)
        xgr = import_xgrammar(cfg.structured)  # before the model loads: required may refuse
        options = dict(ecfg.options or {})
        processor_kwargs = dict(options.pop("processor_kwargs", None) or {})
        path = local_model_dir(ecfg.model, options.pop("storage_options", None))
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if ecfg.device == "auto"
            else ecfg.device
        )
        if ecfg.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[ecfg.dtype]
        trust = bool(ecfg.hf.trust_remote_code)
        self.processor = load_processor(path, trust, **processor_kwargs)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        attn = ecfg.hf.attn_implementation
        kwargs = {"dtype": self.dtype, "trust_remote_code": trust, **options}
        # An actor given several GPUs (cluster.num_gpus_per_actor > 1) splits the model's layers
        # over them (transformers' device map, through accelerate); inputs go to the first.
        self.gpus = torch.cuda.device_count() if self.device == torch.device("cuda") else 0
        if self.compiled:
            check_compile_supported(transformers.__version__, self.gpus)
        elif ecfg.hf.compile is None:  # auto: one CUDA GPU and a checked transformers
            self.compiled = self.device.type == "cuda" and compile_supported(self.gpus)
        if self.gpus > 1:
            kwargs.setdefault("device_map", "auto")
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, attn_implementation=attn, **kwargs
            )
        except (ValueError, ImportError) as exc:
            if attn == "eager":
                raise
            log.warning("attn_implementation=%r refused (%s); using eager", attn, exc)
            model = AutoModelForImageTextToText.from_pretrained(
                path, attn_implementation="eager", **kwargs
            )
        split = getattr(model, "hf_device_map", None)
        self.model = (model if split else model.to(self.device)).eval()
        self.vision = "stock"
        self.use_vision(ecfg.hf.vision)
        self.decode_attention = "stock"
        attention = ecfg.hf.decode_attention
        if attention == "auto" and not self.compiled:
            # grouped wins only under the compiled decode (H100: eager decode 2.11 s a batch
            # grouped vs 1.60 stock; docs/PERFORMANCE.md "Never stuck")
            attention = "stock"
        self.use_decode_attention(attention)
        if split:
            self.device = torch.device("cuda", 0)
        log.info(
            "hf engine: %s on %s as %s, attention %s, transformers %s",
            path,
            f"{self.gpus} GPUs (device map)" if split else self.device,
            self.dtype,
            getattr(self.model.config, "_attn_implementation", attn),
            self.version,
        )
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        self.max_positions = int(text_config.max_position_embeddings)
        self.image_token_id = int(
            getattr(config, "image_token_id", None) or self.processor.image_token_id
        )
        shipped = self.model.generation_config
        eos = shipped.eos_token_id if shipped.eos_token_id is not None else []
        eos = [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (shipped.pad_token_id or eos[0])
        # Replace (not merge) the shipped config: generate() backfills fields a passed config
        # leaves at library defaults from the model's own (Qwen ships do_sample=True, rep 1.05).
        self.model.generation_config = GenerationConfig(
            bos_token_id=shipped.bos_token_id,
            eos_token_id=eos,
            pad_token_id=self.pad_id,
            **generation_kwargs(self.sampling),
        )
        self._setup_compile(cfg)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._counter = None
        if backend is not None:  # a private copy: the processor's one gets padding set per call
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(backend.to_str())
            self._counter.no_padding()
            self._counter.no_truncation()
        self._count_lock = threading.Lock()
        # The processor's tokenizer sets its padding per call: one call at a time (the batching
        # adapter prepares a batch while the last one's answers are decoded).
        self._tokenizer_lock = threading.Lock()
        self._overhead: dict[str | None, int] = {}
        self._split_ok = self._check_split_counting()
        # The model's vocabulary (the logits' width), which Qwen pads past the tokenizer's.
        vocab = getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", None)
        vocab = vocab or self.model.get_output_embeddings().weight.shape[0]
        self.guide = make_guide(
            xgr, cfg.structured, self.tokenizer, int(vocab), sorted(self.eos_ids)
        )
        self.guided = self.guide is not None
        self._mm_type_ids = False
        self._device_inputs: ImageInputs | None = None  # built on first use (a probe call)
        self._image_inputs: ImageInputs | None = None
        self.use_preprocess(ecfg.hf.preprocess)
        stages = ("inputs", "ahead", "generate", "outputs", "vision", "prefill", "decode")
        self._times = dict.fromkeys((*stages, "compile"), 0.0)
        self._last: dict[str, float] = {}
        self._clock = StageClock(self.device)
        try:
            tower = vision_tower(self.model)
        except ValueError as exc:
            log.warning("hf engine: vision time is 0 (%s)", exc)
        else:
            tower.register_forward_pre_hook(self._clock.vision_enter)
            tower.register_forward_hook(self._clock.vision_exit)

    def _device_preprocessing(self) -> ImageInputs | None:
        """The torch image path, if this processor returns only what it knows how to build
        (token ids and mask, optionally modality ids, pixel values, grids); else None (the
        processor does it all, with a warning)."""
        from PIL import Image

        probe = self.processor(
            text=[self.render("probe", None)],
            images=[Image.new("RGB", (2 * PATCH, 2 * PATCH))],
            padding=True,
            return_tensors="pt",
            do_resize=False,
        )
        known = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
        extra = set(probe.keys()) - known - {"mm_token_type_ids"}
        if extra:
            log.warning(
                "engine.hf.preprocess=device: this processor also returns %s; using the "
                "processor for images",
                sorted(extra),
            )
            return None
        self._mm_type_ids = "mm_token_type_ids" in probe
        return ImageInputs(self.processor.image_processor, self.device, self.dtype)

    def use_preprocess(self, mode: str) -> None:
        """``device`` or ``processor`` from now on (``engine.hf.preprocess``)."""
        if mode == "device" and self._device_inputs is None:
            self._device_inputs = self._device_preprocessing()
        self._image_inputs = self._device_inputs if mode == "device" else None

    def _modality_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Per token: 1 for an image's, 0 for text (what the processor returns with them)."""
        make = getattr(self.processor, "create_mm_token_type_ids", None)
        if make is not None:
            return torch.tensor(make(ids.tolist()), dtype=torch.long)
        return (ids == self.image_token_id).long()

    def _setup_compile(self, cfg: Config) -> None:
        """``engine.hf.compile``: the batch-size rungs and transformers' own compiled decode step
        (``compile_config``; CUDA graphs on GPU)."""
        self._rungs = batch_rungs(cfg.batching.max_batch_size)
        gib = cfg.engine.hf.static_cache_gib
        cap = default_cap(self.device) if gib is None else int(gib * 2**30)
        text_config = self.model.config.get_text_config(decoder=True)
        # (rung, length) -> its StaticCache, reused batch after batch, within the cap
        self.caches = StaticCaches(text_config, self.dtype, cap, cfg.engine.hf.compile_shapes)
        if self.compiled:
            self.use_compile(True)

    def use_compile(self, on: bool) -> None:
        """The compiled decode on or off from now on (``engine.hf.compile``; the GPU benchmark
        switches it on one loaded model). Compiled graphs and caches are kept for later; off
        clears the generation config's ``compile_config`` (transformers warns on every eager
        call while one is set)."""
        if on:
            check_compile_supported(transformers.__version__, self.gpus)
        self.compiled = on
        if not on:
            self.model.generation_config.compile_config = None
            return
        if getattr(self, "_compile_config", None) is None:
            from transformers.generation.configuration_utils import CompileConfig

            on_cuda = self.device.type == "cuda"
            # dynamic: one compile serves every cache length of a batch rung (a new length is
            # a new CUDA graph capture, not a new compile: tens of seconds each on a 7B, and a
            # job of mixed image sizes met one per length; docs/PERFORMANCE.md "Never stuck")
            self._compile_config = CompileConfig(
                fullgraph=False, dynamic=True, mode="reduce-overhead" if on_cuda else "default"
            )
            if not on_cuda:  # transformers compiles on accelerators only unless told to
                self._compile_config._compile_all_devices = True
            # 5.x renamed generate's and forward's past_key_values to cache
            params = inspect.signature(self.model.forward).parameters
            self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            # Each (rung, length) is its own graph: room for a mixed-size job's steps.
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
            log.info("hf engine: compiled decode, batch rungs %s", self._rungs)
        self.model.generation_config.compile_config = self._compile_config

    def use_vision(self, mode: str) -> None:
        """``dense``, ``stock`` or ``auto`` vision attention from now on (``engine.hf.vision``,
        ``hf_vision``; ``auto``: dense where this transformers' vision attention is the known
        shape, else stock with a warning; ``dense`` raises there)."""
        from .hf_vision import disable_dense_vision, enable_dense_vision

        self.vision = self._switch(
            "vision", mode, "dense", enable_dense_vision, disable_dense_vision
        )

    def use_decode_attention(self, mode: str) -> None:
        """``grouped``, ``stock`` or ``auto`` decode attention from now on
        (``engine.hf.decode_attention``, ``hf_gqa``; ``auto``: grouped where this transformers'
        text model is the known shape, else stock with a warning; ``grouped`` raises there)."""
        from .hf_gqa import disable_grouped_decode, enable_grouped_decode

        self.decode_attention = self._switch(
            "decode_attention", mode, "grouped", enable_grouped_decode, disable_grouped_decode
        )

    def _switch(self, knob: str, mode: str, fast: str, enable, disable) -> str:
        """Puts the model in an ``auto | <fast> | stock`` setting's mode; returns the mode it
        runs in. ``enable`` returns how much it switched (0: this attention implementation
        stays stock) or raises ``ValueError`` for a model of unknown shape, which ``fast``
        passes on and ``auto`` answers with stock and a warning."""
        if mode == "stock":
            disable(self.model)
            return "stock"
        try:
            switched = enable(self.model)
        except ValueError as exc:
            if mode == fast:
                raise
            log.warning("engine.hf.%s=auto: stays stock (%s)", knob, exc)
            return "stock"
        if not switched:
            log.info("engine.hf.%s=%s: this attention implementation stays stock", knob, mode)
        return fast if switched else "stock"

    def use_answer_lengths(self, spec: str) -> None:
        """Benchmark answer lengths from now on (``engine.hf.answer_lengths``; "" = off)."""
        self.answer_lengths = spec

    def _pad_rows(self, inputs: Any, n: int) -> None:
        """Append ``n`` dummy rows to the batch: one attended token each (the first row's last,
        so no row ends in padding: transformers would warn of right padding), no image."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        dummy_mask = torch.zeros((n, mask.shape[1]), dtype=mask.dtype, device=mask.device)
        dummy_mask[:, -1] = 1
        dummy = torch.full((n, ids.shape[1]), self.pad_id, dtype=ids.dtype, device=ids.device)
        dummy[:, -1] = ids[0, -1]
        inputs["input_ids"] = torch.cat([ids, dummy])
        inputs["attention_mask"] = torch.cat([mask, dummy_mask])
        if "mm_token_type_ids" in inputs:
            types = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat(
                [types, torch.zeros_like(types[:1]).expand(n, -1)]
            )

    def modes(self) -> dict[str, Any]:
        cap = self.caches.cap_bytes
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": "device" if self._image_inputs is not None else "processor",
            "vision": self.vision,
            "decode": "compiled" if self.compiled else "eager",
            "decode_attention": self.decode_attention,
            "static_cache_gib": None if cap is None else round(cap / 2**30, 2),
            "compiled_shapes": [list(s) for s in self.caches.shapes()],
        }

    def stage_times(self) -> dict[str, float]:
        return dict(self._times)

    def reset_stage_times(self) -> None:
        self._times = dict.fromkeys(self._times, 0.0)

    def last_stages(self) -> dict[str, float]:
        """The last batch's figures: seconds in each stage (as :meth:`stage_times`), ``rows``
        (the batch's requests), ``batch`` (rows run, dummy rows of the compiled decode included)
        and ``steps`` (decode steps: new tokens of its longest row)."""
        return dict(self._last)

    # ----------------------------------------------------------------- prompts and counting

    def render(self, prompt: str, system: str | None) -> str:
        """The templated text of one request, with one image placeholder."""
        return self.processor.apply_chat_template(
            chat_messages(prompt, system), tokenize=False, add_generation_prompt=True
        )

    def _encode_len(self, text: str, specials: bool = False) -> int:
        if self._counter is not None:
            return len(self._counter.encode(text, add_special_tokens=specials).ids)
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=specials)["input_ids"])

    def _full_count(self, prompt: str, system: str | None) -> int:
        """Tokens of the templated text as the processor tokenizes it, minus the image pad."""
        text = self.render(prompt, system).replace(self.processor.image_token, "", 1)
        return self._encode_len(text, specials=True)

    def _check_split_counting(self) -> bool:
        """Does template overhead + prompt tokens equal the full count (prompt between specials)?"""
        probe = "Probe: 12 words, (x) y?\nEnd"
        with self._count_lock:
            return self._full_count(probe, None) == self._full_count("", None) + self._encode_len(
                probe
            )

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        """Exact text tokens of the templated prompt, not counting the image's tokens."""
        with self._count_lock:
            if not self._split_ok:
                return self._full_count(prompt, system)
            if system not in self._overhead:
                self._overhead[system] = self._full_count("", system)
            return self._overhead[system] + self._encode_len(prompt)

    # ------------------------------------------------------------------------------ generate

    def prepare(self, requests: list[Request]) -> HostBatch:
        """The rows that fit the model and their inputs on the host (template, tokens, pixels
        stacked and pinned); the rows too long for it end here as errors."""
        t0 = time.perf_counter()
        refused: list[Result] = []
        batch: list[Request] = []
        for req in requests:
            width, height = req.image.size
            need = self.count_text_tokens(req.prompt, req.system) + (height // 28) * (width // 28)
            if need >= self.max_positions:
                msg = f"prompt is {need} tokens; the model takes at most {self.max_positions}"
                refused.append(Result(req.key, error_code=RowError.ENGINE_ERROR, error_message=msg))
            else:
                batch.append(req)
        host = self.host_inputs(batch) if batch else None
        return HostBatch(batch, refused, host, time.perf_counter() - t0)

    def generate(self, requests: list[Request], prepared: HostBatch | None = None) -> list[Result]:
        ahead = prepared is not None  # done while the previous batch ran: off the model's path
        p = prepared if prepared is not None else self.prepare(requests)
        results = list(p.refused)
        if p.requests:
            results.extend(self._generate(p.requests, p.host, p.seconds, ahead))
        return results

    def warmup(self, batch_size: int) -> None:
        """A batch of gray 448x448 images at the job's sampling: CUDA kernel selection for
        every decode length, cuBLAS workspaces and the caching allocator's first blocks happen
        here, not in real work. With ``engine.hf.compile`` it compiles the decode graph of
        ``batch_size``'s rung at the longest answer; the seconds it took are logged."""
        from PIL import Image

        side = 448 // (2 * PATCH)  # in 28-pixel tiles; smaller if image.max_pixels is
        while side > 1 and (side * 2 * PATCH) ** 2 > self._max_pixels:
            side -= 1
        image = Image.new("RGB", (side * 2 * PATCH,) * 2, (128, 128, 128))
        requests = [
            Request(("warmup", i), "warmup", "Describe this image.", None, image, "", side**2, 0)
            for i in range(batch_size)
        ]
        t0 = time.perf_counter()
        lengths, self.answer_lengths = self.answer_lengths, ""  # the longest answers' cache
        try:
            self.generate(requests)
        finally:
            self.answer_lengths = lengths
        if self.compiled:
            log.info(
                "hf engine: warm-up compiled the decode for a batch of %d in %.1f s",
                batch_size,
                time.perf_counter() - t0,
            )

    def model_inputs(self, batch: list[Request]) -> Any:
        """What ``generate`` takes for ``batch``: token ids and mask (left-padded), pixel
        values and grids, on the engine's device."""
        return self.device_inputs(self.host_inputs(batch))

    def host_inputs(self, batch: list[Request]) -> tuple[Any, HostImages | None]:
        """The CPU part of ``model_inputs``: tokens (and, with the processor's own image path,
        the pixels), and the images stacked for the device."""
        texts = [self.render(r.prompt, r.system) for r in batch]
        images = [r.image for r in batch]
        if self._image_inputs is not None:
            host = self._image_inputs.host_side(images)
            token = self.processor.image_token
            texts = expand_placeholders(texts, images, token, self._image_inputs)
            with self._tokenizer_lock:
                inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
            if self._mm_type_ids:  # transformers 5: which tokens are an image's
                inputs["mm_token_type_ids"] = self._modality_ids(inputs["input_ids"])
            return inputs, host
        with self._tokenizer_lock:
            inputs = self.processor(
                text=texts,
                images=images,
                padding=True,
                return_tensors="pt",
                do_resize=False,  # the runner resized to the grid already
            )
        for image, thw in zip(images, inputs["image_grid_thw"].tolist()):
            width, height = image.size
            if thw != [1, height // PATCH, width // PATCH]:
                raise ValueError(f"processor grid {thw} for a {width}x{height} image: resized?")
        return inputs, None

    def device_inputs(self, host: tuple[Any, HostImages | None]) -> Any:
        inputs, images = host
        if images is not None:
            assert self._image_inputs is not None
            pixels, grid = self._image_inputs.device_side(images)
            inputs["pixel_values"], inputs["image_grid_thw"] = pixels, grid  # grids from sizes
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _rung(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """(batch size, cache length) a batch of ``rows`` needing ``tokens`` runs at under the
        compiled decode, or None: run it eagerly (compile off, a batch no static cache can hold,
        or one whose cache would pass the caches' memory cap: warned)."""
        if not self.compiled:
            return None
        rung = next((r for r in self._rungs if r >= rows), None)
        length = static_cache_len(tokens, self.max_positions)
        if rung is None or tokens > length:
            log.warning(
                "engine.hf.compile: a batch of %d rows x %d tokens does not fit a static cache "
                "(at most %s rows x %d tokens); it runs eagerly",
                rows,
                tokens,
                self._rungs[-1],
                length,
            )
            return None
        if not self.caches.fits(rung, length):
            return None
        return rung, length

    def _compile_shape(self, rung: int, length: int) -> None:
        """Compile (and capture) the decode step of a new shape on a throwaway batch of the
        smallest image, before the batch that needs it runs: its seconds are the compile's."""
        from PIL import Image

        image = Image.new("RGB", (2 * PATCH, 2 * PATCH), (128, 128, 128))
        batch = [
            Request(("compile", i), "compile", "Hi", None, image, "", 1, 0) for i in range(rung)
        ]
        inputs = self.model_inputs(batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            # a few decode steps: CUDA graph trees run a new graph once before capturing it
            steps = {"max_new_tokens": 4, "min_new_tokens": 4}
            cache = {self._cache_kwarg: self.caches.get(rung, length)}
            self.model.generate(**inputs, **steps, **cache)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self._times["compile"] += seconds
        log.info(
            "hf engine: compiled the decode for %d rows x %d tokens in %.1f s (%d of at most "
            "%d shapes, %.2f GiB of caches)",
            rung,
            length,
            seconds,
            len(self.caches.by_shape),
            self.caches.max_shapes,
            self.caches.held_bytes / 2**30,
        )

    def _generate(
        self, batch: list[Request], host: Any, host_s: float, ahead: bool
    ) -> list[Result]:
        t0 = time.perf_counter()
        inputs = self.device_inputs(host)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_tokens = mask.sum(dim=1).tolist()
        vision_tokens = (ids == self.image_token_id).sum(dim=1).tolist()
        limits = [
            max(1, min(self.sampling.max_tokens, self.max_positions - n)) for n in prompt_tokens
        ]
        drawn = None  # benchmark answer lengths: where each row's answer ends
        if self.answer_lengths:
            drawn = [answer_length(self.answer_lengths, r.row_id) for r in batch]
        ends = None if drawn is None else [min(n, limit) for n, limit in zip(drawn, limits)]
        shape = self._rung(len(batch), ids.shape[1] + max(ends or limits))
        rung = shape[0] if shape else None
        rows = ends
        if rung is not None and rung > len(batch):  # dummy rows end after one token
            self._pad_rows(inputs, rung - len(batch))
            rows = (ends or limits) + [1] * (rung - len(batch))
        processors: list[Any] = [FirstLogits(self._clock, self.alive)]
        if self.guide is not None:
            processors.append(self.guide.processor(rung or len(batch), rows))
        extra: dict[str, Any] = {"logits_processor": transformers.LogitsProcessorList(processors)}
        if rows is not None:
            stop_rule = RowLengths(ids.shape[1], rows, self.device)
            extra["stopping_criteria"] = transformers.StoppingCriteriaList([stop_rule])
        if rung is None and self.compiled:
            extra["disable_compile"] = True
        torch.manual_seed(self.sampling.seed)
        t1 = time.perf_counter()
        self._clock.start()
        if shape is not None and shape not in self.caches.by_shape:
            self._compile_shape(*shape)
        try:
            with torch.inference_mode():
                if shape is not None:
                    extra[self._cache_kwarg] = self.caches.get(*shape)
                out = self.model.generate(**inputs, max_new_tokens=max(limits), **extra)
        finally:
            self._clock.stop()
        new = out[:, ids.shape[1] :].cpu().tolist()  # waits for the GPU
        t2 = time.perf_counter()
        stages = self._clock.split()
        results = []
        for k, (req, row, limit, n_prompt, n_vision) in enumerate(
            zip(batch, new, limits, prompt_tokens, vision_tokens)
        ):
            row = row[: limit if ends is None else ends[k]]
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            n_out = len(row) if stop is None else stop + 1
            # Ended by the answer-length rule (not by max_tokens): a finished answer.
            ruled = stop is None and drawn is not None and drawn[k] <= limit
            results.append(
                Result(
                    req.key,
                    text=self._decode(row[:n_out]),
                    finish_reason="length" if stop is None and not ruled else "stop",
                    prompt_tokens=int(n_prompt),
                    vision_tokens=int(n_vision),
                    output_tokens=n_out,
                )
            )
        last = {
            "inputs": t1 - t0 + (0.0 if ahead else host_s),
            "ahead": host_s if ahead else 0.0,
            "generate": t2 - t1,
            "outputs": time.perf_counter() - t2,
        }
        last.update(stages)
        for stage, seconds in last.items():
            self._times[stage] += seconds
        steps = out.shape[1] - ids.shape[1]
        self._last = {**last, "rows": len(batch), "batch": out.shape[0], "steps": steps}
        return results

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = None
        del model
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def make_hf_engine(cfg: Config, incarnation: int = 0) -> HFEngine:
    """The registry's builder (a model load does not depend on the incarnation)."""
    return HFEngine(cfg)
