"""How TensorRT-LLM 1.2 fails, told apart: a row's own failure, or an executor that is dead.

On 1.2 a failing forward step sends the same ``RequestError`` to every active request and the
executor keeps looping, so a fatal CUDA error looks like many row failures; a killed worker
answers nothing; a background error shuts the executor down (README, "Engines").
"""

from __future__ import annotations

import re
from typing import Any

# Errors after which no later step can succeed on this process's GPU context.
FATAL = re.compile(
    r"cuda error|cudaerror|illegal memory access|illegal address|device-side assert"
    r"|uncorrectable ecc|nccl|cublas_status_execution_failed",
    re.IGNORECASE,
)
OUT_OF_MEMORY = re.compile(r"out of memory", re.IGNORECASE)


def is_request_error(exc: BaseException) -> bool:
    """Upstream's per-request failure (``tensorrt_llm.executor.utils.RequestError``). Told by
    class name, so no executor module need be imported."""
    return any(cls.__name__ == "RequestError" for cls in type(exc).__mro__)


def is_shut_down(exc: BaseException) -> bool:
    """``generate_async``'s refusal once the executor is shut down ("LLM is shutting down")."""
    return isinstance(exc, RuntimeError) and "shutting down" in str(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    """A request that ran out of GPU memory: dropped with its KV freed, worth one more try."""
    return OUT_OF_MEMORY.search(str(exc)) is not None


def is_fatal(exc: BaseException) -> bool:
    """A CUDA, NCCL or cuBLAS failure: sticky for the process, whatever request it names."""
    return not is_out_of_memory(exc) and FATAL.search(str(exc)) is not None


def executor_down(llm: Any) -> bool:
    """The executor is shut down or shutting down (``doing_shutdown`` is set before any of the
    shutdown's blocking waits, so this is seen even while a thread is stuck in them)."""
    executor = llm._executor
    return executor is None or executor.doing_shutdown or executor.is_shutdown()


class Breaker:
    """Consecutive per-request errors with no success between them: ``limit`` of them (a full
    in-flight batch failed together) mean the engine, not the rows, is broken."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.run = 0

    def success(self) -> None:
        self.run = 0

    def error(self) -> bool:
        """Counts one error; True once the run reaches the limit."""
        self.run += 1
        return self.run >= self.limit
