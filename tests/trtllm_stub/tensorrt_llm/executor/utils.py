"""Stand-in ``tensorrt_llm.executor.utils``: upstream's per-request error type (tests only)."""


class RequestError(RuntimeError):
    """The error raised when the request is failed (upstream's own docstring)."""
