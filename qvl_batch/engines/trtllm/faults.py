"""How TensorRT-LLM 1.2 fails, told apart: a row's own failure, or a dead executor."""

from __future__ import annotations


def is_request_error(exc: BaseException) -> bool:
    """Upstream's per-request failure (``tensorrt_llm.executor.utils.RequestError``): the
    executor lives on. Told by class name, so no executor module need be imported."""
    return any(cls.__name__ == "RequestError" for cls in type(exc).__mro__)


def is_shut_down(exc: BaseException) -> bool:
    """``generate_async``'s refusal once the executor is shut down ("LLM is shutting down")."""
    return isinstance(exc, RuntimeError) and "shutting down" in str(exc)
