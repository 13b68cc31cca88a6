"""The engine seam: a stream of requests in, results out as each finishes.

Engines see images the runner already decoded, oriented and resized to the Qwen grid; they own
the chat template, tokenisation and decoding. Heavy imports stay inside each engine module.

The seam (:class:`Engine`), used by the actor from one feeding thread:

- ``start(sink)`` once, then ``submit(requests)`` whenever the actor has prepared rows and fewer
  than ``max_in_flight`` of its rows are inside the engine. ``submit`` never waits for answers.
- Each request ends with exactly one ``sink.put(result)`` (any order, any thread, key echoed).
- Before a request can run on the model, the engine calls ``sink.entering(keys)`` (it returns
  once the rows are on record with the driver's flight recorder, so a process death is blamed on
  the rows that were really inside). Engines call it once per group, never once per row.
- ``flush()``: nothing more is coming until results come back; run whatever is held now.
- An engine that can run nothing more (its executor died) calls ``sink.fail(exc)``; the actor
  then dies so the driver replaces it and retries its units.

In-flight engines (TensorRT-LLM, the fake engine's in-flight mode) implement the stream
natively. Lock-step engines (transformers, the fake engine's batch mode) implement
:class:`BatchEngine` (``generate(batch) -> results``) and reach the seam through the one
:class:`~qvl_batch.engines.batching.BatchingAdapter`, which buckets rows by size. Which engine
a job gets: the registry (``qvl_batch.engines``) and :mod:`qvl_batch.engines.build`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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
    finish_reason: str | None = None  # "stop" | "length" | "timeout" | "cancelled"
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


class EngineDead(RuntimeError):
    """The engine can run nothing more (executor shut down, background error): the actor must
    be replaced, and the rows inside it run again elsewhere."""


class ResultSink(Protocol):
    """Where an engine reports (the actor implements it)."""

    def entering(self, keys: Sequence[tuple[str, int]]) -> None:
        """These rows are about to run on the model; returns once they are on record."""

    def put(self, result: Result) -> None:
        """One request finished (its row leaves the engine)."""

    def fail(self, exc: BaseException) -> None:
        """The engine is dead; no more results will come."""

    def alive(self) -> None:
        """A sign of life between results (a lock-step batch's decode step): the engine is
        working, not hung (the actor's watchdog, ``liveness.py``)."""


class _EngineInfo:
    """What every engine reports about itself, streamed or lock-step."""

    name: str = "base"
    version: str = "0"
    # True when answers are constrained to cfg.structured.json_schema (guided decoding).
    guided: bool = False

    def modes(self) -> dict[str, Any]:
        """How this engine runs where a setting's ``auto`` was resolved when it loaded (e.g. the
        hf engine's vision, decode and decode attention); the actor records them with its GPUs
        in ``_metrics.json``'s ``actors``."""
        return {}

    def stage_times(self) -> dict[str, float]:
        """Seconds spent so far in the engine's own stages (e.g. inputs, generate), if it
        keeps them; the actor reports them as ``engine_<stage>_s`` next to its own timings."""
        return {}

    def reset_stage_times(self) -> None:
        """Start the stage clocks again (after the warm-up)."""

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        """Estimate of the text tokens of a prompt (chat template included), for batching."""
        return estimate_text_tokens(prompt, system)

    def close(self) -> None:
        """Release the model and any device memory."""


class Engine(_EngineInfo, ABC):
    """A model runner owned by one actor, fed as a stream (see the module docstring)."""

    # While the engine holds at least half its bound, the actor hands rows over in groups of
    # at least this many: engines that put rows on record at each ``submit`` set it so the
    # flight recorder is asked once per group, not once per row.
    entry_group: int = 1

    @property
    @abstractmethod
    def max_in_flight(self) -> int:
        """How many of the actor's rows may be inside the engine at once."""

    @abstractmethod
    def start(self, sink: ResultSink) -> None:
        """Where results go; called once, before the first ``submit``."""

    @abstractmethod
    def submit(self, requests: list[Request]) -> None:
        """Hand requests over; returns without waiting for their answers."""

    def flush(self) -> None:
        """No more requests until results come back: run what is held (lock-step engines)."""

    def take_back(self, unit_id: str) -> int | None:
        """Give back the rows of ``unit_id`` held but not started (their unit moves to another
        actor): how many, or None if any has started (then nothing is given back). An
        in-flight engine starts a row when it takes it, so by default nothing comes back."""
        return None

    def warmup(self) -> None:
        """Pay one-time costs (kernels, workspaces) before ``start``, with throwaway requests."""

    def padding(self) -> dict[str, Any] | None:
        """Padding figures of the batches run (lock-step engines), else None."""
        return None


def _no_watchdog() -> None:
    pass


class BatchEngine(_EngineInfo, ABC):
    """A lock-step engine: runs one padded batch at a time. It calls ``alive()`` at each step
    of a batch (the batching adapter connects it to the actor's watchdog), so a batch longer
    than ``limits.stall_s`` is not taken for a hang."""

    alive: Callable[[], None] = staticmethod(_no_watchdog)

    def prepare(self, requests: list[Request]) -> Any:
        """The host work of a batch that needs no model (chat template, tokens, pixels), which
        the batching adapter does while the previous batch runs; ``generate`` takes it back.
        None: nothing to do ahead."""
        return None

    @abstractmethod
    def generate(self, requests: list[Request], prepared: Any = None) -> list[Result]:
        """Run one batch; return one Result per request (any order, keys echoed).
        ``prepared``: what ``prepare(requests)`` returned, or None (then it is done here)."""

    def warmup(self, batch_size: int) -> None:
        """Run a throwaway batch of ``batch_size`` rows (one-time costs paid up front)."""


def estimate_text_tokens(prompt: str, system: str | None) -> int:
    """Text tokens of a prompt with the chat template, without a tokenizer: 24 + chars / 4."""
    return 24 + (len(prompt) + len(system or "")) // 4
