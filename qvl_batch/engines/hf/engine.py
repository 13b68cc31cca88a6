"""The transformers engine: Qwen2.5-VL, one ``model.generate`` per batch (CPU and GPU).

The model directory's own chat template and tokenizer, left padding; images arrive on the
28-pixel grid and become pixels on the model's device (``inputs.py``) or through the processor.
The job's ``sampling`` section is the whole truth (the checkpoint's sampling defaults are not
used); ``torch.manual_seed(seed)`` runs before every batch. Greedy float32 output is the same
row by row or batched, eager or compiled (CPU tests). A prompt with no room under the model's
``max_position_embeddings`` is ENGINE_ERROR; anything else that fails raises from ``generate``
and the batching adapter isolates the row. Benchmark answer lengths
(``engine.benchmark.answer_lengths``) end each row at a length drawn from its id, as a
random-weight model never emits EOS.
Stage clocks: ``inputs`` (on the model's path), ``ahead`` (prepared while the last batch ran),
``generate`` (``vision``, ``prefill``, ``decode`` inside it), ``outputs``, ``compile``.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from ...config import Config, SamplingConfig
from ...errors import RowError
from ...rows.images import TILE
from .. import settings_of
from ..base import BatchEngine, Request, Result
from ..lengths import answer_length
from .allocator import settle_allocator
from .clock import FirstLogits, StageClock
from .decode import (
    StaticCaches,
    batch_rungs,
    check_compile_supported,
    compile_supported,
    default_cap,
    static_cache_len,
)
from .guided import import_xgrammar, make_guide
from .inputs import BatchInputs
from .loading import load_processor, local_model_dir
from .thread import ModelThread
from .tokens import PromptTokens
from .vision import vision_tower

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
        hf = settings_of(cfg, "hf")
        self.sampling = cfg.sampling
        self.answer_lengths = cfg.engine.benchmark.answer_lengths  # "" = the model decides
        self._max_pixels = cfg.image.max_pixels
        self._thread = ModelThread()  # every model call on one thread (thread.py says why)
        self._warming = False  # in warmup(): its shape compiles at once
        self.allocator = "n/a"  # the CUDA caching allocator's settings (allocator.py)
        self.compiled = bool(hf.compile)  # None (auto) is decided once the device is known
        if self.compiled:
            check_compile_supported(transformers.__version__, 0)
        xgr = import_xgrammar(cfg.structured)  # before the model loads: required may refuse
        self._load_model(cfg.engine)
        self._generation_ids()
        self._setup_compile(cfg)
        self.tokens = PromptTokens(self.processor)
        self._setup_guide(xgr, cfg)
        self.inputs = BatchInputs(
            self.processor, self.tokens, self.device, self.dtype, self.image_token_id
        )
        self.vision = self.decode_attention = "stock"
        attention = hf.decode_attention
        if attention == "auto" and not self.compiled:
            # grouped wins only under the compiled decode (docs/PERFORMANCE.md "Never stuck")
            attention = "stock"
        self.set_modes(preprocess=hf.preprocess, vision=hf.vision, decode_attention=attention)
        self._stage_clocks()

    def _load_model(self, ecfg: Any) -> None:
        """Processor and model on the job's device and dtype; decides ``compile: auto``."""
        from transformers import AutoModelForImageTextToText

        options = dict(ecfg.options or {})
        processor_kwargs = dict(options.pop("processor_kwargs", None) or {})
        path = local_model_dir(ecfg.model, options.pop("storage_options", None))
        auto_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto_device if ecfg.device == "auto" else ecfg.device)
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
        if self.device.type == "cuda":
            self.allocator = settle_allocator()
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

    def _generation_ids(self) -> None:
        """Positions, image token, EOS and pad ids; the job's sampling as the model's
        generation config, replacing (not merged with) the shipped one."""
        from transformers import GenerationConfig

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
        # generate() backfills fields a passed config leaves at library defaults from the
        # model's own (Qwen ships do_sample=True, repetition_penalty 1.05): none are left.
        self.model.generation_config = GenerationConfig(
            bos_token_id=shipped.bos_token_id,
            eos_token_id=eos,
            pad_token_id=self.pad_id,
            **generation_kwargs(self.sampling),
        )

    def _setup_guide(self, xgr: Any | None, cfg: Config) -> None:
        """The job's schema compiled against the model's vocabulary (the logits' width, which
        Qwen pads past the tokenizer's), or None: free generation."""
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        vocab = getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", None)
        vocab = vocab or self.model.get_output_embeddings().weight.shape[0]
        self.guide = make_guide(
            xgr, cfg.structured, self.tokenizer, int(vocab), sorted(self.eos_ids)
        )
        self.guided = self.guide is not None

    def _stage_clocks(self) -> None:
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

    def set_modes(
        self,
        *,
        preprocess: str | None = None,
        vision: str | None = None,
        compile: bool | None = None,
        decode_attention: str | None = None,
        answer_lengths: str | None = None,
    ) -> None:
        """How the loaded model runs from now on, each as its ``engine.hf`` setting (None: as
        it is). The constructor sets them from the job; the GPU benchmark switches them on one
        loaded model."""
        if preprocess is not None:
            self.inputs.use(preprocess)
        if vision is not None:
            from .vision import disable_dense_vision, enable_dense_vision

            self.vision = self._switch(
                "vision", vision, "dense", enable_dense_vision, disable_dense_vision
            )
        if compile is not None:
            self._use_compile(compile)
        if decode_attention is not None:
            from .gqa import disable_grouped_decode, enable_grouped_decode

            self.decode_attention = self._switch(
                "decode_attention",
                decode_attention,
                "grouped",
                enable_grouped_decode,
                disable_grouped_decode,
            )
        if answer_lengths is not None:
            self.answer_lengths = answer_lengths  # "" = off

    def _setup_compile(self, cfg: Config) -> None:
        """``engine.hf.compile``: the batch-size rungs and transformers' own compiled decode step
        (``compile_config``; CUDA graphs on GPU)."""
        self._rungs = batch_rungs(cfg.batching.max_batch_size)
        gib = settings_of(cfg, "hf").static_cache_gib
        cap = default_cap(self.device) if gib is None else int(gib * 2**30)
        text_config = self.model.config.get_text_config(decoder=True)
        # (rung, length) -> its StaticCache, reused batch after batch, within the cap
        hf = settings_of(cfg, "hf")
        self.caches = StaticCaches(
            text_config, self.dtype, cap, hf.compile_shapes, hf.compile_after
        )
        if self.compiled:
            self._use_compile(True)

    def _use_compile(self, on: bool) -> None:
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

    def modes(self) -> dict[str, Any]:
        cap = self.caches.cap_bytes
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": self.inputs.mode,
            "vision": self.vision,
            "decode": "compiled" if self.compiled else "eager",
            "decode_attention": self.decode_attention,
            "static_cache_gib": None if cap is None else round(cap / 2**30, 2),
            "compiled_shapes": [list(s) for s in self.caches.shapes()],
            "allocator": self.allocator,
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
        return self.tokens.render(prompt, system)

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        """Exact text tokens of the templated prompt, not counting the image's tokens."""
        return self.tokens.count(prompt, system)

    # ------------------------------------------------------------------------------ generate

    def prepare(self, requests: list[Request]) -> HostBatch:
        """The rows that fit the model and their inputs on the host (template, tokens, pixels
        stacked and pinned); the rows too long for it end here as errors."""
        t0 = time.perf_counter()
        refused: list[Result] = []
        batch: list[Request] = []
        for req in requests:
            need = self.count_text_tokens(req.prompt, req.system) + req.vision_tokens
            if need >= self.max_positions:
                msg = f"prompt is {need} tokens; the model takes at most {self.max_positions}"
                refused.append(Result(req.key, error_code=RowError.ENGINE_ERROR, error_message=msg))
            else:
                batch.append(req)
        host = self.inputs.host_side(batch) if batch else None
        return HostBatch(batch, refused, host, time.perf_counter() - t0)

    def generate(self, requests: list[Request], prepared: HostBatch | None = None) -> list[Result]:
        ahead = prepared is not None  # done while the previous batch ran: off the model's path
        p = prepared if prepared is not None else self.prepare(requests)
        results = list(p.refused)
        if p.requests:
            batch = (p.requests, p.host, p.seconds, ahead)
            results.extend(self._thread.run(self._generate, *batch))
        return results

    def warmup(self, batch_size: int) -> None:
        """A batch of gray 448x448 images at the job's sampling: CUDA kernel selection for
        every decode length, cuBLAS workspaces and the caching allocator's first blocks happen
        here, not in real work. With ``engine.hf.compile`` its shape (``batch_size``'s rung at
        the longest answer) is compiled now, whatever ``compile_after``: otherwise the first batch
        of a square 448x448 job paid it (~75 s on an H100, docs/PERFORMANCE.md)."""
        requests = self.warmup_requests(batch_size)
        t0 = time.perf_counter()
        lengths, self.answer_lengths = self.answer_lengths, ""  # the longest answers' cache
        self._warming = True
        try:
            self.generate(requests)
        finally:
            self.answer_lengths, self._warming = lengths, False
        if self.compiled:
            log.info(
                "hf engine: warm-up of a batch of %d in %.1f s (compiled shapes: %s)",
                batch_size,
                time.perf_counter() - t0,
                self.caches.shapes(),
            )

    def warmup_requests(self, n: int) -> list[Request]:
        """``n`` throwaway requests: gray 448x448 images (smaller if image.max_pixels is)."""
        from PIL import Image

        side = 448 // TILE  # in tiles
        while side > 1 and (side * TILE) ** 2 > self._max_pixels:
            side -= 1
        image = Image.new("RGB", (side * TILE,) * 2, (128, 128, 128))
        return [
            Request(("warmup", i), "warmup", "Describe this image.", None, image, "", side**2, 0)
            for i in range(n)
        ]

    def model_inputs(self, batch: list[Request]) -> Any:
        """What ``generate`` takes for ``batch``, on the engine's device."""
        return self.inputs.model_inputs(batch)

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
        if not self.caches.fits(rung, length, now=self._warming):
            return None
        return rung, length

    def _compile_shape(self, rung: int, length: int) -> bool:
        """Compile (and capture) the decode step of a new shape on a throwaway batch of the
        smallest image, before the batch that needs it runs: its seconds are the compile's.
        False if it raised: the shape is dropped and its batches run eagerly (a shape kept after
        a failed capture failed every batch of it, down to single rows: session 12)."""
        from PIL import Image

        image = Image.new("RGB", (TILE, TILE), (128, 128, 128))
        batch = [
            Request(("compile", i), "compile", "Hi", None, image, "", 1, 0) for i in range(rung)
        ]
        inputs = self.model_inputs(batch)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                # a few decode steps: CUDA graph trees run a new graph once before capturing it
                steps = {"max_new_tokens": 4, "min_new_tokens": 4}
                cache = {self._cache_kwarg: self.caches.get(rung, length)}
                self.model.generate(**inputs, **steps, **cache)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            self.caches.drop(rung, length)
            self._times["compile"] += time.perf_counter() - t0
            log.warning(
                "engine.hf.compile: compiling the decode for %d rows x %d tokens failed (%s: "
                "%s); batches of that shape run eagerly",
                rung,
                length,
                type(exc).__name__,
                exc,
            )
            return False
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
        return True

    def _generate(
        self, batch: list[Request], host: Any, host_s: float, ahead: bool
    ) -> list[Result]:
        t0 = time.perf_counter()
        inputs = self.inputs.device_side(host)
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
            self.inputs.pad_rows(inputs, rung - len(batch), self.pad_id)
            rows = (ends or limits) + [1] * (rung - len(batch))
        processors: list[Any] = [FirstLogits(self._clock, self.alive)]
        if self.guide is not None:
            processors.append(self.guide.processor(rung or len(batch), rows))
        extra: dict[str, Any] = {"logits_processor": transformers.LogitsProcessorList(processors)}
        if rows is not None:
            stop_rule = RowLengths(ids.shape[1], rows, self.device)
            extra["stopping_criteria"] = transformers.StoppingCriteriaList([stop_rule])
        t1 = time.perf_counter()
        if shape is not None and shape not in self.caches.by_shape:
            shape = shape if self._compile_shape(*shape) else None
        if shape is None and self.compiled:
            extra["disable_compile"] = True
        torch.manual_seed(self.sampling.seed)  # after a compile's throwaway batch
        self._clock.start()  # the compile is in generate's seconds, not in prefill's
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
                    text=self.tokens.decode(row[:n_out]),
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

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = None
        del model
        self._thread.close()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
