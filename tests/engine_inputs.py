"""What the hf engine tests share: a small job's config and engine requests (no fixtures: a plain
helper module)."""

from __future__ import annotations


def engine_requests(n: int, prompt: str = "Describe this image.") -> list:
    """``n`` engine requests over random images of three sizes (112x84, 84x140, 56x56) and two
    prompt lengths: every batch of two or more is left-padded."""
    import numpy as np
    from PIL import Image

    from qvl_batch.engines.base import Request

    sizes = [(112, 84), (84, 140), (56, 56)]
    out = []
    for i in range(n):
        width, height = sizes[i % 3]
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        out.append(
            Request(
                key=("unit", i),
                row_id=f"row-{i}",
                prompt=prompt + " Be brief." * (i % 2),
                system=None,
                image=Image.fromarray(pixels),
                image_sha256="0" * 64,
                vision_tokens=(width // 28) * (height // 28),
                text_tokens=0,
            )
        )
    return out


def small_engine_config(model: str, **hf_knobs):
    """A small job on the CPU: max_batch_size 4 (compiled rungs 1, 2, 4), images up to 112x140,
    12 new tokens: every batch fits the shortest static cache (128 tokens)."""
    from qvl_batch.config import (
        BatchingConfig,
        Config,
        EngineConfig,
        ImageConfig,
        PromptConfig,
        SamplingConfig,
    )
    from qvl_batch.engines.hf.settings import HFEngineConfig

    return Config(
        engine=EngineConfig(name="hf", model=model, device="cpu", hf=HFEngineConfig(**hf_knobs)),
        sampling=SamplingConfig(max_tokens=12),
        prompt=PromptConfig(max_prompt_tokens=64),
        image=ImageConfig(max_pixels=112 * 140),
        batching=BatchingConfig(max_batch_size=4),
    )
