"""Stand-in ``tensorrt_llm.executor`` (tests only): what the runner may meet from it."""

from .utils import RequestError as RequestError
