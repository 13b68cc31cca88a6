"""STAND-IN for NVIDIA TensorRT-LLM, for tests only: it is NOT TensorRT-LLM and runs no model.

TensorRT-LLM cannot be installed in this test environment (it needs CUDA, and PyPI carries only
stubs that download from NVIDIA's index). This package stands in for the part of its LLM API that
``qvl_batch.engines.trtllm`` uses, built at import time from ``tests/data/trtllm_api_surface.json``
(names and defaults read from the public TensorRT-LLM source): each constructor and call accepts
exactly the names listed there and rejects all others, so the engine's use of the API is checked
name by name. Tests put ``tests/trtllm_stub`` on ``sys.path`` (or PYTHONPATH for Ray workers);
nothing else should. Generation is a deterministic toy: text from a hash of prompt, image pixels
and seed, prompt ids from a whitespace tokenizer with each image pad expanded to (h/28)*(w/28)
image token ids. Where the real package is installed, the ``trtllm``-marked tests run instead.

How it fails as 1.2 does (per the 1.2 failure notes, trtllm_failures_1_2.md; each switch is a
key of env ``TRTLLM_STUB``, see ``_surface.StubBehaviour``):
- ``LLM()`` starts a worker child process that outlives its parent; ``kill_worker`` (or any
  kill of it) leaves pending results unanswered forever and the executor "healthy";
- while the worker is dead, ``abort()``, ``shutdown()`` and ``generate_async`` block
  (``dead_blocks``, default on; ``block_s`` bounds it for tests);
- ``step_error`` fails every running request of that step with RequestError (``sticky``);
  ``oom``/``oom_once`` fail one request with a CUDA OOM RequestError;
- an aborted waiting request never answers (``answer_aborted_waiting`` restores an answer);
- a background error (``die_after``) is raised by the next submit or response after a
  shutdown, then "LLM is shutting down"; ``llm._executor.is_shutdown()``/``doing_shutdown``;
- the multimodal-hash token count asserts against ``do_resize=False`` images (``hash_check``).
"""

from . import _surface
from . import llmapi as llmapi  # the real package imports this submodule too

__version__ = "0.0.0+stub"  # never a real version, so logs and reports show the stand-in ran

# Classes whose import path in the JSON is the top-level package (LLM, SamplingParams).
globals().update(
    {name: getattr(_surface, name) for name, home in _surface.HOMES.items() if home == __name__}
)
