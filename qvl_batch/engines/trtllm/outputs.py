"""A finished request as the runner's Result: counts, finish reasons, a failed row."""

from __future__ import annotations

from typing import Any

from ...errors import RowError
from ..base import Request, Result


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
    """Map a finished RequestOutput to a Result; counts fall back to the runner's own. A request
    the runtime timed out or cancelled is an error row, not a truncated answer."""
    completion = output.outputs[0]
    if completion.finish_reason == "timeout":
        msg = "TensorRT-LLM timed the request out (finish_reason 'timeout')"
        return Result(request.key, error_code=RowError.ENGINE_TIMEOUT, error_message=msg)
    if completion.finish_reason == "cancelled":
        msg = "TensorRT-LLM cancelled the request (finish_reason 'cancelled')"
        return Result(request.key, error_code=RowError.ENGINE_ERROR, error_message=msg)
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
    """A failed row: this request only, the others are unaffected."""
    return Result(
        request.key, error_code=RowError.ENGINE_ERROR, error_message=f"{type(exc).__name__}: {exc}"
    )
