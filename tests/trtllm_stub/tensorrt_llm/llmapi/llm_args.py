"""Stand-in ``tensorrt_llm.llmapi.llm_args``: ``TorchLlmArgs.model_fields`` only (the LLM's
argument names from the JSON, as pydantic lists a model's fields), for feature detection."""

from typing import Any, ClassVar

from .. import _surface


class TorchLlmArgs:
    model_fields: ClassVar[dict[str, Any]] = dict(_surface.LLM_PARAMS)
