"""transformers engine: the reference implementation of Qwen2.5-VL inference (CPU and GPU).

One ``model.generate`` call per batch: the model directory's own chat template, its processor
(images are already on the 28-pixel grid, so the processor is told not to resize), left padding.

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
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import transformers

from ..config import Config, SamplingConfig
from .base import Engine, Request, Result

log = logging.getLogger(__name__)

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


class HFEngine(Engine):
    """Qwen2.5-VL through ``transformers``; one ``generate`` call per batch."""

    name = "hf"
    version = transformers.__version__

    def __init__(self, cfg: Config):
        from transformers import AutoModelForImageTextToText, GenerationConfig

        ecfg = cfg.engine
        self.sampling = cfg.sampling
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
        self.model = model.to(self.device).eval()
        log.info(
            "hf engine: %s on %s as %s, attention %s, transformers %s",
            path,
            self.device,
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
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._counter = None
        if backend is not None:  # a private copy: the processor's one gets padding set per call
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(backend.to_str())
            self._counter.no_padding()
            self._counter.no_truncation()
        self._count_lock = threading.Lock()
        self._overhead: dict[str | None, int] = {}
        self._split_ok = self._check_split_counting()

    # ----------------------------------------------------------------- prompts and counting

    def render(self, prompt: str, system: str | None) -> str:
        """The templated text of one request, with one image placeholder."""
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _encode_len(self, text: str, specials: bool = False) -> int:
        if self._counter is not None:
            return len(self._counter.encode(text, add_special_tokens=specials).ids)
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

    def generate(self, requests: list[Request]) -> list[Result]:
        results: list[Result] = []
        batch: list[Request] = []
        for req in requests:
            width, height = req.image.size
            need = self.count_text_tokens(req.prompt, req.system) + (height // 28) * (width // 28)
            if need >= self.max_positions:
                msg = f"prompt is {need} tokens; the model takes at most {self.max_positions}"
                results.append(Result(req.key, error_code="ENGINE_ERROR", error_message=msg))
            else:
                batch.append(req)
        if batch:
            results.extend(self._generate(batch))
        return results

    def _generate(self, batch: list[Request]) -> list[Result]:
        texts = [self.render(r.prompt, r.system) for r in batch]
        inputs = self.processor(
            text=texts,
            images=[r.image for r in batch],
            padding=True,
            return_tensors="pt",
            do_resize=False,  # the runner resized to the grid already
        )
        for req, thw in zip(batch, inputs["image_grid_thw"].tolist()):
            width, height = req.image.size
            if thw != [1, height // PATCH, width // PATCH]:
                raise ValueError(f"processor grid {thw} for a {width}x{height} image: resized?")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_tokens = mask.sum(dim=1).tolist()
        vision_tokens = (ids == self.image_token_id).sum(dim=1).tolist()
        limits = [
            max(1, min(self.sampling.max_tokens, self.max_positions - n)) for n in prompt_tokens
        ]
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        torch.manual_seed(self.sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max(limits))
        new = out[:, ids.shape[1] :].cpu().tolist()
        results = []
        for req, row, limit, n_prompt, n_vision in zip(
            batch, new, limits, prompt_tokens, vision_tokens
        ):
            row = row[:limit]
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            n_out = len(row) if stop is None else stop + 1
            results.append(
                Result(
                    req.key,
                    text=self.tokenizer.decode(row[:n_out], skip_special_tokens=True),
                    finish_reason="length" if stop is None else "stop",
                    prompt_tokens=int(n_prompt),
                    vision_tokens=int(n_vision),
                    output_tokens=n_out,
                )
            )
        return results

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
