"""The engine seam: ``generate(requests) -> results`` and ``close()``.

Engines see images the runner already decoded, oriented and resized to the Qwen grid; they own
the chat template, tokenisation and decoding. Heavy imports stay inside each engine module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..config import Config


@dataclass
class Request:
    """One row to generate for. ``key`` is (unit id, row index in unit): results must echo it."""

    key: tuple[str, int]
    row_id: str
    prompt: str
    system: str | None
    image: Any  # PIL.Image.Image, RGB, already resized to multiples of 28
    image_sha256: str
    vision_tokens: int
    text_tokens: int  # estimate used for batching; engines report the exact count in Result


@dataclass
class Result:
    """What an engine returns per request; ``error_code`` set means the row failed."""

    key: tuple[str, int]
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0  # text + vision tokens fed to the model
    vision_tokens: int = 0
    output_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    # Set by the actor, not by engines: the parsed structured-output columns, and the earlier
    # job a carried-over (reused) result comes from.
    values: dict[str, Any] | None = None
    reused_from: str | None = None


class EngineError(RuntimeError):
    """A whole generate() call failed; the caller may split the batch and retry."""


class Engine(ABC):
    """A model runner owned by one actor."""

    name: str = "base"
    version: str = "0"
    # True when generate() constrains answers to cfg.structured.json_schema (guided decoding).
    guided: bool = False

    def stage_times(self) -> dict[str, float]:
        """Seconds spent so far in the engine's own stages (e.g. inputs, generate), if it
        keeps them; the actor reports them as ``engine_<stage>_s`` next to its own timings."""
        return {}

    def reset_stage_times(self) -> None:  # noqa: B027 - optional hook
        """Start the stage clocks again (after the warm-up)."""

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Result]:
        """Run one batch; return one Result per request (any order, keys echoed)."""

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        """Estimate of the text tokens of a prompt (chat template included), for batching."""
        return estimate_text_tokens(prompt, system)

    def warmup(self, batch_size: int) -> None:  # noqa: B027 - optional hook
        """Run a throwaway batch of ``batch_size`` rows (one-time costs paid up front)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any device memory."""


def estimate_text_tokens(prompt: str, system: str | None) -> int:
    """Text tokens of a prompt with the chat template, without a tokenizer: 24 + chars / 4."""
    return 24 + (len(prompt) + len(system or "")) // 4


def make_engine(cfg: Config, incarnation: int = 0) -> Engine:
    """Build the configured engine. ``incarnation`` counts actor replacements (fault tests)."""
    name = cfg.engine.name
    if name == "fake":
        from .fake import FakeEngine

        return FakeEngine(cfg, incarnation=incarnation)
    if name == "hf":
        from .hf import HFEngine  # type: ignore[import-not-found]

        return HFEngine(cfg)
    if name == "trtllm":
        from .trtllm import TrtLlmEngine  # type: ignore[import-not-found]

        return TrtLlmEngine(cfg)
    raise ValueError(f"unknown engine {name!r}")
