"""The model directory's side of a request: chat template, EOS ids, image token and vocabulary."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...rows.prompts import chat_messages

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"  # Qwen2.5-VL image placeholder; the processor expands it per image

IMAGE_TOKEN_ID = 151655  # its id in the Qwen2.5-VL vocabulary (config.json: image_token_id)

DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2.5-VL's template adds without one

QWEN_EOS = ("<|im_end|>", "<|endoftext|>")  # Qwen2.5-VL-Instruct's generation_config eos ids


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


def processor_pixel_bounds(model: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) the model's image processor resizes to: preprocessor_config.json's
    keys, or its ``size`` (shortest_edge, longest_edge) in newer files; None where unreadable."""
    try:
        conf = json.loads((Path(model) / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return None
    size = conf.get("size") if isinstance(conf.get("size"), dict) else {}
    low = conf.get("min_pixels", size.get("shortest_edge"))
    high = conf.get("max_pixels", size.get("longest_edge"))
    return (low, high) if isinstance(low, int) and isinstance(high, int) else None


def check_image_bounds(cfg: Any) -> None:
    """image.min_pixels/max_pixels inside the processor's: TensorRT-LLM 1.2 counts an image's
    tokens with the processor's own bounds (its multimodal hash path) and fails a request whose
    image yields another count; inside them, its resize of the runner's images is a no-op."""
    bounds = processor_pixel_bounds(cfg.engine.model)
    if bounds is None:  # a hub name, or a directory only the GPU hosts see: the engine checks
        return
    low, high = bounds
    image = cfg.image
    if image.min_pixels < low or image.max_pixels > high:
        raise ConfigError(
            f"image.min_pixels={image.min_pixels}, image.max_pixels={image.max_pixels}: "
            f"engine trtllm needs both within the model's preprocessor_config.json bounds "
            f"[{low}, {high}] (TensorRT-LLM counts image tokens with those); set "
            f"image.min_pixels >= {low} and image.max_pixels <= {high}"
        )
