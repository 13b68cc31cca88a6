"""``qvl-batch bench attention``: one decode step's text attention, copied vs grouped, side by side.

The hf engine's decode attention (``engine.hf.decode_attention``) at a model size's real shapes
(layers, query heads, KV heads, head size: ``--size``; no weights needed): for each batch size
and cache length, one query a head over a ``(B, kv_heads, L, head_dim)`` cache under a left
padding mask, as every decode step of a left-padded batch runs it. ``copied`` is what
transformers' SDPA function does with a mask (4.57.3 and 5.17 in every decode step, 5.24 under
``torch.compile``): each KV head copied out to its query heads (``repeat_kv``), then SDPA;
``grouped`` is ``qvl_batch.engines.hf.gqa``. Prints milliseconds per layer and per step (x
layers), the ratio, and the largest difference between the two outputs. On the GPU if there is
one (bf16), else the CPU (float32): a kernel-level figure, not images/s (``bench gpu`` times
whole batches).
"""

from __future__ import annotations

import argparse
import time
import types

from .common import emit_json


def _timed(fn, iters: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls, after three warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def decode_attention_case(
    shape: dict, batch: int, length: int, device: str, dtype, iters: int
) -> dict:
    """Stock and grouped decode attention on one (batch, cache length) at ``shape``."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from ..engines.hf.gqa import grouped_decode_attention

    heads, kv_heads, dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator(device=device).manual_seed(batch * 7919 + length)
    query = torch.randn(batch, 1, heads, dim, generator=g, device=device, dtype=dtype)
    query = query.transpose(1, 2)  # (B, heads, 1, D), laid out as the projection leaves it
    key = torch.randn(batch, kv_heads, length, dim, generator=g, device=device, dtype=dtype)
    value = torch.randn(batch, kv_heads, length, dim, generator=g, device=device, dtype=dtype)
    # Left padding: row r's first r % 32 positions are padding (no row all padding).
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
    for row in range(batch):
        mask[row, ..., : min(row % 32, length - 1)] = False
    module = types.SimpleNamespace(
        num_key_value_groups=heads // kv_heads, is_causal=True, training=False
    )
    scale = dim**-0.5
    groups = heads // kv_heads
    cuda = device.startswith("cuda")

    def copied():
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale
        ).transpose(1, 2)

    def grouped():
        return grouped_decode_attention(module, query, key, value, mask, scaling=scale)[0]

    with torch.inference_mode():
        diff = float((copied().float() - grouped().float()).abs().max())
        copied_s = _timed(copied, iters, cuda)
        grouped_s = _timed(grouped, iters, cuda)
    layers = shape["layers"]
    return {
        "batch": batch,
        "cache_len": length,
        "copied_ms_per_layer": round(copied_s * 1e3, 4),
        "grouped_ms_per_layer": round(grouped_s * 1e3, 4),
        "copied_ms_per_step": round(copied_s * 1e3 * layers, 3),
        "grouped_ms_per_step": round(grouped_s * 1e3 * layers, 3),
        "grouped_speedup": round(copied_s / grouped_s, 3) if grouped_s else None,
        "max_abs_diff": diff,
    }


def bench_attention(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..tooling.modelgen import text_attention_shape

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float32
    )
    shape = text_attention_shape(args.size)
    report: dict = {
        "bench": "attention",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "size": args.size,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "cases": [],
    }
    print(
        f"decode attention, {args.size} ({shape['heads']} query heads over {shape['kv_heads']} "
        f"KV heads, head size {shape['head_dim']}, {shape['layers']} layers) on "
        f"{report['device']} in {report['dtype']}, transformers {transformers.__version__}",
        flush=True,
    )
    for batch in args.batch_sizes:
        for length in args.cache_lens:
            case = decode_attention_case(shape, batch, length, device, dtype, args.iters)
            report["cases"].append(case)
            print(
                f"B={batch:>4} cache {length:>5}: copied {case['copied_ms_per_step']:8.2f} ms/step"
                f"  grouped {case['grouped_ms_per_step']:8.2f} ms/step  "
                f"x{case['grouped_speedup']}  (max |diff| {case['max_abs_diff']:.2e})",
                flush=True,
            )
    emit_json(report, args.json_out)
    return 0


def add_attention_bench(kinds, common) -> None:
    p = kinds.add_parser("attention", help="one decode step's attention: copied vs grouped")
    common(p)
    p.add_argument("--size", choices=("7b", "3b", "tiny"), default="7b", help="model shapes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--cache-lens", type=int, nargs="+", default=[384, 768])
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_attention)
