"""``qvl-batch bench submit``: the CPU work one TensorRT-LLM submitting thread does per request.

TensorRT-LLM 1.2 runs a multimodal request's input processing inside ``generate_async``, in the
caller's thread, and the trtllm engine calls it from one thread (upstream's submit path is not
thread-safe); the same thread detokenizes each answer. Per request, on images of each
``--sizes`` (a side in pixels, or ``max``: the largest the default image.max_pixels allows),
this times: the HF processor (slow and fast; ``modeling_qwen2vl.py``: ``self.processor(text=[
text], images=images, padding=True, return_tensors='pt', **mm_processor_kwargs)``, its resize a
no-op inside the processor's bounds), the mRoPE positions (``get_rope_index``, a Python loop),
hashing the image for the multimodal cache (blake3 where installed, as upstream; else sha256,
named so), the shared-memory copy of ``pixel_values`` (torch's file_system strategy, as
``to_handle``), pickling and signing the request (its IPC, HMAC-SHA256) and detokenizing an
answer of ``--answer-tokens``. It says how many requests per second one thread sustains.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import inspect
import json
import pickle
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


def _hasher():
    """(name, bytes -> digest): blake3 as TensorRT-LLM hashes images, where installed."""
    try:
        import blake3

        return "hash_blake3", lambda data: blake3.blake3(data).digest()
    except ImportError:
        return "hash_sha256", lambda data: hashlib.sha256(data).digest()


def _rope_call(model, inputs):
    """() -> the mRoPE positions of ``inputs``, as the model computes them."""
    owner = getattr(model, "model", model)
    rope = getattr(owner, "get_rope_index", None) or model.get_rope_index
    accepted = inspect.signature(rope).parameters
    given = {k: v for k, v in inputs.items() if k in accepted}
    if "mm_token_type_ids" in accepted and "mm_token_type_ids" not in given:
        # transformers 5.x: 1 marks image tokens (what its processor adds)
        given["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    return lambda: rope(**given)


def _sides(sizes: list[str]) -> list[tuple[int, int]]:
    from ..config import ImageConfig
    from ..engines.trtllm.engine import largest_grid

    out = []
    for size in sizes:
        if size == "max":
            out.append(largest_grid(ImageConfig().max_pixels))
        else:
            side = int(size) // 28 * 28
            out.append((side, side))
    return out


def time_one_size(model, processors, width: int, height: int, args) -> dict:
    """Milliseconds per stage for one image size, and the requests/s one thread sustains."""
    import numpy as np
    import torch
    from PIL import Image

    from ..engines.trtllm.prompts import render_chat

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    stages, n = {}, args.requests
    for name, processor in processors.items():
        text = render_chat(processor, "Describe this image.", None)

        def process(processor=processor, text=text):
            return processor(text=[text], images=[image], padding=True, return_tensors="pt")

        stages[name] = 1e3 * _time(process, n)
        inputs = process()
    stages["rope"] = 1e3 * _time(_rope_call(model, inputs), n)
    hash_name, digest = _hasher()
    stages[hash_name] = 1e3 * _time(lambda: digest(image.tobytes()), n)
    pixels = inputs["pixel_values"]
    stages["shared_memory"] = 1e3 * _time(lambda: pixels.clone().share_memory_(), n)
    ids = inputs["input_ids"][0].tolist()
    request = {"prompt_token_ids": ids, "pixel_values": ("/torch_shm_handle", pixels.shape)}
    key = b"k" * 32

    def ipc():
        blob = pickle.dumps(request)
        return hmac.new(key, blob, hashlib.sha256).digest()

    stages["ipc"] = 1e3 * _time(ipc, n)
    tokenizer = next(iter(processors.values())).tokenizer
    answer = [int(t) for t in rng.integers(100, 20000, args.answer_tokens)]
    stages["detokenize"] = 1e3 * _time(lambda: tokenizer.decode(answer), n)
    common = sum(ms for name, ms in stages.items() if name not in processors)
    per_request = {name: stages[name] + common for name in processors}
    return {
        "size": f"{width}x{height}",
        "vision_tokens": int(inputs["image_grid_thw"].prod() // 4),
        "pixel_values_mb": pixels.numel() * pixels.element_size() / 1e6,
        "stages_ms": stages,
        "per_request_ms": per_request,
        "requests_per_s_one_thread": {k: 1e3 / v for k, v in per_request.items()},
        "torch_threads": torch.get_num_threads(),
    }


def bench_submit(args: argparse.Namespace) -> int:
    import torch
    import torch.multiprocessing
    from transformers import AutoModelForImageTextToText

    from ..engines.hf.loading import load_processor

    torch.set_num_threads(1)  # one submitting thread
    torch.multiprocessing.set_sharing_strategy("file_system")  # as TensorRT-LLM's handles
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processors = {
        "processor_slow": load_processor(args.model, use_fast=False),
        "processor_fast": load_processor(args.model, use_fast=True),
    }
    runs = [time_one_size(model, processors, w, h, args) for w, h in _sides(args.sizes)]
    report = {"bench": "submit", "requests": args.requests, "answer_tokens": args.answer_tokens}
    report["sizes"] = runs
    for run in runs:
        print(
            f"submit path, one thread, {run['size']} images ({run['vision_tokens']} vision "
            f"tokens, pixel_values {run['pixel_values_mb']:.1f} MB), median of {args.requests}:"
        )
        for name, ms in run["stages_ms"].items():
            print(f"  {name:<16} {ms:8.2f} ms")
        for name, ms in run["per_request_ms"].items():
            print(f"  with {name}: {ms:.2f} ms a request -> {1e3 / ms:.0f} requests/s")
    text = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


def add_submit_bench(kinds, common) -> None:
    p = kinds.add_parser("submit", help="CPU per request in TensorRT-LLM's submitting thread")
    common(p)
    p.add_argument("--model", required=True, help="a Qwen2.5-VL model directory")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["448", "max"],
        help="image sides in pixels, or max (the largest the default image.max_pixels allows)",
    )
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--answer-tokens", type=int, default=110, help="tokens detokenized a request")
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_submit)
