"""The compute floor of ``qvl-batch bench gpu``: rows/s a card could reach on a workload if every
FLOP were matrix work, from the workload's own token counts.

A row costs ~2 x (text parameters) FLOPs per token the text model reads or writes (its vision
tokens, its prompt, its answer) plus ~2 x (vision-tower parameters) per vision patch (4 patches
per vision token); attention's own FLOPs are left out, as the issue's figure leaves them out.
The issue gave 126 images/s for the 7B in bf16 on an H200 at 448x448 (256 vision tokens), ~50
prompt and 64 output tokens, without its sum: by this count that is 0.84 of the H200's dense
bf16 rate (989 TFLOP/s), and that fraction is kept for every workload and card, so the old case
gives back 126 and a workload's floor moves only with its FLOPs per row and the card's rate.
"""

from __future__ import annotations

import json
from pathlib import Path

# The floor and what it was for (kept here so every figure derives from one place).
FLOOR_IMAGES_PER_S = 126.0
FLOOR_NOTE = "7B bf16 on one H200, 448x448 images, ~50 prompt + 64 output tokens"

# Dense bf16 matrix rate (FLOP/s, no sparsity) by a substring of the device name, most specific
# first. H100 SXM and H200 share the compute die: the H200's extra is memory, not FLOPs.
DENSE_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
H200_BF16 = 989e12

PATCHES_PER_VISION_TOKEN = 4  # the 2x2 merge: 4 14x14 patches make one vision token
# Qwen2.5-VL-7B's parameters that do matrix work per token (config.json, see model_params):
# text 7.07e9 (28 layers + the 152064-row LM head; the input embedding is a lookup) and the
# vision tower 0.676e9 (32 blocks, the merger, the patch embedding).
PARAMS_7B = (7.070e9, 0.676e9)
# The case: 448x448 = 256 vision tokens, ~50 prompt tokens, 64 answer tokens.
REFERENCE_TOKENS = (256.0, 50.0, 64.0)


def row_flops(
    text_params: float,
    vision_params: float,
    vision_tokens: float,
    prompt_tokens: float,
    answer_tokens: float,
) -> float:
    """FLOPs of one row: the text model over every token it reads or writes, and the vision
    tower over the image's patches."""
    text = 2 * text_params * (vision_tokens + prompt_tokens + answer_tokens)
    return text + 2 * vision_params * PATCHES_PER_VISION_TOKEN * vision_tokens


# The share of the card's dense rate the 126 images/s stands for (~0.84).
ACHIEVABLE = FLOOR_IMAGES_PER_S * row_flops(*PARAMS_7B, *REFERENCE_TOKENS) / H200_BF16


def floor_rows_per_s(
    text_params: float,
    vision_params: float,
    vision_tokens: float,
    prompt_tokens: float,
    answer_tokens: float,
    flops_per_s: float = H200_BF16,
) -> float:
    """Rows/s at the floor: the card's rate (at the issue's share of it) over a row's FLOPs."""
    flops = row_flops(text_params, vision_params, vision_tokens, prompt_tokens, answer_tokens)
    return ACHIEVABLE * flops_per_s / flops


def card_rate(device: str) -> tuple[float, str]:
    """(dense bf16 FLOP/s, which card it is for) from a device name; the H200's rate for a card
    not in :data:`DENSE_BF16` (the CPU too), said so in the label."""
    for name, rate in DENSE_BF16:
        if name.lower() in device.lower():
            return rate, name
    return H200_BF16, f"H200 (assumed: {device} is not in the table)"


def model_params(model: str | Path) -> tuple[float, float]:
    """(text, vision) parameters that do matrix work per token / per patch, from a model
    directory's ``config.json`` (flat hub layout or ``text_config``); the 7B's without one."""
    path = Path(model, "config.json")
    if not path.exists():
        return PARAMS_7B
    cfg = json.loads(path.read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    head = h // text["num_attention_heads"]
    kv = text.get("num_key_value_heads", text["num_attention_heads"]) * head
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    text_params = layers * per_layer + h * text["vocab_size"]  # + the LM head
    v = cfg["vision_config"]
    d, merge = v["hidden_size"], v.get("spatial_merge_size", 2)
    blocks = v["depth"] * (4 * d * d + 3 * d * v["intermediate_size"])
    merged = d * merge**2
    merger = merged * merged + merged * v.get("out_hidden_size", h)
    patch = v.get("in_chans", 3) * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2 * d
    return float(text_params), float(blocks + merger + patch)


def floor_for(model: str | Path, device: str, tokens: dict) -> dict:
    """The floor of rows with these mean token counts (``vision``, ``prompt``, ``answer``) for
    a model directory on a device, with what it was computed from."""
    text_params, vision_params = model_params(model)
    rate, card = card_rate(device)
    per_row = (tokens["vision"], tokens["prompt"], tokens["answer"])
    return {
        "rows_per_s": round(floor_rows_per_s(text_params, vision_params, *per_row, rate), 3),
        "card": card,
        "dense_bf16_tflops": rate / 1e12,
        "achievable_fraction": round(ACHIEVABLE, 4),
        "text_params": text_params,
        "vision_params": vision_params,
        "tokens_per_row": {k: round(v, 2) for k, v in tokens.items()},
        "gflops_per_row": round(row_flops(text_params, vision_params, *per_row) / 1e9, 1),
    }
