"""The CUDA caching allocator's settings for the hf engine.

A batch of large photos frees the vision tower's activations, then asks for the prefill's larger
ones: with fixed segments the cache keeps both, and an H100 80GB showed 73.2 GiB in use (92%) on
the mixed photos job whether the decode was compiled or not (docs/PERFORMANCE.md, "Never stuck").
Expandable segments grow one mapping instead, so freed memory serves the next, larger request.
A user's own ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) is left as it is.
"""

from __future__ import annotations

import os

import torch

SETTING = "expandable_segments:True"
_USER_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def settle_allocator() -> str:
    """Expandable segments unless the user configured the allocator; what is in force, in
    words. Before CUDA starts the variable is enough; after, the allocator is told directly."""
    for name in _USER_VARIABLES:
        if os.environ.get(name):
            return f"{name}={os.environ[name]} (the user's)"
    if torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(SETTING)
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = SETTING
    return SETTING
