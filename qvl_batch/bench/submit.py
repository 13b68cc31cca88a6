"""``qvl-batch bench submit``: the CPU work one TensorRT-LLM submitting thread does per request.

TensorRT-LLM runs a multimodal request's input processing inside ``generate_async``, in the
caller's thread, and the trtllm engine calls it from one thread (upstream's submit path is not
thread-safe). For Qwen2.5-VL that work is the model's HF processor on the (already resized)
image and templated prompt (its resize a no-op: the job's pixel bounds lie inside the
processor's, ``check_image_bounds``; ``_torch/models/modeling_qwen2vl.py``:
``self.processor(text=[text], images=images, padding=True, return_tensors='pt',
**mm_processor_kwargs)``), then the mRoPE position ids
(``get_rope_index``, a Python loop). This times both, per request, with transformers' slow and
fast image processors (1.0 used the slow one, later versions the fast one), on images of
``--size`` pixels a side, and says how many requests per second one thread sustains. Hashing the
image (``create_input_processor_with_hash``) and handing tensors to the executor process come on
top and are not timed here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path


def _time(fn, n: int) -> float:
    """Median seconds of ``fn()`` over ``n`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_submit(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from ..engines.hf.loading import load_processor
    from ..engines.trtllm.prompts import render_chat

    torch.set_num_threads(1)  # one submitting thread
    side = args.size // 28 * 28
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    report: dict = {"bench": "submit", "size": side, "requests": args.requests, "stages_ms": {}}
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    rope_owner = getattr(model, "model", model)
    rope = getattr(rope_owner, "get_rope_index", None) or model.get_rope_index
    total_ms = {}
    for fast in (False, True):
        processor = load_processor(args.model, use_fast=fast)
        text = render_chat(processor, "Describe this image.", None)

        def process(processor=processor, text=text):
            return processor(text=[text], images=[image], padding=True, return_tensors="pt")

        inputs = process()
        name = "processor_fast" if fast else "processor_slow"
        report["stages_ms"][name] = 1e3 * _time(process, args.requests)
        if "rope" not in report["stages_ms"]:
            accepted = inspect.signature(rope).parameters
            given = {k: v for k, v in inputs.items() if k in accepted}
            if "mm_token_type_ids" in accepted and "mm_token_type_ids" not in given:
                # transformers 5.x: 1 marks image tokens (what its processor adds)
                image_id = model.config.image_token_id
                given["mm_token_type_ids"] = (inputs["input_ids"] == image_id).long()

            def positions(given=given):
                return rope(**given)

            report["stages_ms"]["rope"] = 1e3 * _time(positions, args.requests)
        report["vision_tokens"] = int(inputs["image_grid_thw"].prod() // 4)
        total_ms[name] = report["stages_ms"][name] + report["stages_ms"]["rope"]
    report["per_request_ms"] = total_ms
    report["requests_per_s_one_thread"] = {k: 1e3 / v for k, v in total_ms.items()}
    print(
        f"submit path, one thread, {side}x{side} images ({report['vision_tokens']} vision "
        f"tokens), median of {args.requests}:"
    )
    for name, ms in report["stages_ms"].items():
        print(f"  {name:<16} {ms:8.2f} ms")
    for name, ms in total_ms.items():
        print(f"  {name} + rope: {ms:.2f} ms a request -> {1e3 / ms:.0f} requests/s")
    text = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


def add_submit_bench(kinds, common) -> None:
    p = kinds.add_parser("submit", help="CPU per request in TensorRT-LLM's submitting thread")
    common(p)
    p.add_argument("--model", required=True, help="a Qwen2.5-VL model directory")
    p.add_argument("--size", type=int, default=448, help="image side in pixels")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_submit)
