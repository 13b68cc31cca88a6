"""Qwen2.5-VL checkpoints with random weights, for tests and benchmarks without hub access.

:func:`make_test_model` writes an ordinary model directory (``config.json``, safetensors weights,
tokenizer, chat template, image-processor config, generation config) that loads through
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` / ``AutoModelForImageTextToText`` /
``AutoProcessor.from_pretrained`` exactly like the published weights (and, like them, needs
torchvision for ``AutoProcessor``: Qwen2.5-VL's video processor does; without it
:func:`qvl_batch.engines.hf.loading.load_processor` builds the same processor with no video
processor).

* ``tiny``: the real architecture at toy width, ~23 MB (20 MB of bf16 weights, almost all the
  151936-row tied embedding, and a 4 MB ``tokenizer.json``): for CPU tests. Its embedding is
  shaped (:func:`_shape_vocab`) so greedy decoding mostly emits trained tokens and sometimes stops.
* ``3b`` / ``7b``: the published Qwen2.5-VL-3B/7B-Instruct configs with random bf16 weights,
  written tensor by tensor into ~5 GB shards, so building 7B needs about one shard of RAM.
  For throughput and memory benchmarks: the outputs are noise.

The tokenizer is a byte-level BPE trained on generated English (a few thousand tokens), padded with
filler tokens to Qwen's 151643 regular tokens, then Qwen's 22 added tokens at their real ids
(``<|endoftext|>`` 151643 ... ``<|image_pad|>`` 151655 ... ``<|file_sep|>`` 151664), with Qwen's
pre-tokenizer, so the chat template and the image-token ids are the real ones. Filler tokens decode
as `` w<id>``; the BPE never produces them, so only a random model's outputs contain them.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch

from .chat_template import CHAT_TEMPLATE

SIZES = ("tiny", "3b", "7b")
SHARD_BYTES = 5 * 1000**3
REGULAR_TOKENS = 151643  # Qwen2's BPE vocabulary; added tokens follow
TRAINED_VOCAB = 4000
IM_END = 151645
# Tiny model's init: see _shape_vocab.
TINY_STD = 0.2
FILLER_SCALE = 0.1
EOS_SCALE = 1.5
# (token, special) at ids 151643.. in order, as in Qwen2.5-VL's tokenizer.json.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_VISION_COMMON = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
# The text-model fields that differ between the published 3B and 7B configs (and our tiny one).
_TEXT = {
    "3b": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_window_layers": 70,
        "tie_word_embeddings": True,
        "mrope_section": [16, 24, 24],
        "max_position_embeddings": 128000,
        "vocab_size": 151936,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_window_layers": 28,
        "tie_word_embeddings": False,
        "mrope_section": [16, 24, 24],
        "max_position_embeddings": 128000,
        # The published 7B pads its embedding to 152064 rows (the 3B has 151936): 8,292,166,656
        # parameters, as its safetensors index's total_size says (16,584,333,312 bytes).
        "vocab_size": 152064,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
        "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8
        "max_position_embeddings": 8192,
        "vocab_size": 151936,
    },
}


def text_attention_shape(size: str) -> dict[str, int]:
    """The text model's attention of a size: layers, query heads, KV heads and head size."""
    text = _TEXT[size]
    return {
        "layers": text["num_hidden_layers"],
        "heads": text["num_attention_heads"],
        "kv_heads": text["num_key_value_heads"],
        "head_dim": text["hidden_size"] // text["num_attention_heads"],
    }


_TINY_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "fullatt_block_indexes": [1],
}


def model_config(size: str) -> dict[str, Any]:
    """The ``config.json`` dict for a size, in the published (flat, hub) layout."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    text = dict(_TEXT[size])
    mrope = text.pop("mrope_section")
    vision = {**_VISION_COMMON, **(_TINY_VISION if size == "tiny" else {})}
    vision["out_hidden_size"] = text["hidden_size"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        # As published. transformers 4.57.3 also reads it: without it, it warns that a local
        # tokenizer may have Mistral's broken regex.
        "transformers_version": "4.41.2",
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vision_config": vision,
        **text,
    }


def make_test_model(out: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a random-weight Qwen2.5-VL model directory of ``size`` to ``out``; return its path."""
    cfg = model_config(size)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("model*.safetensors*"):  # a previous build's weights
        stale.unlink()
    _write_json(path / "config.json", cfg)
    _write_json(
        path / "generation_config.json",
        {  # Qwen2.5-VL-Instruct's, verbatim (engines override the sampling fields)
            "bos_token_id": 151643,
            "pad_token_id": 151643,
            "do_sample": True,
            "eos_token_id": [151645, 151643],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
        },
    )
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
        },
    )
    _write_json(path / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    trained = _write_tokenizer(path, seed)
    _write_weights(path, cfg, size, seed, trained if size == "tiny" else None)
    return str(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------- tokenizer

_WORDS = (
    "the a an this that image photo picture of in on at with and or but is are was were be "
    "describe what how many which where who why when colour color colours dominate main object "
    "distinct shapes can you see taken indoors outdoors write short alt text list three things "
    "notice separated by commas detail layout positions anything looks unusual answer paragraph "
    "sentence cat dog tree sky river city street car person table window light red blue green "
    "yellow white black small large bright dark old new wooden stone field mountain beach food "
    "plate there here one two four five left right top bottom middle background foreground "
    "circle square line edge corner gradient texture pattern scene view building road water "
    "grass cloud sun shadow people man woman child animal bird flower house door wall floor "
    "please help assistant user system you are helpful"
)


def _corpus(seed: int, sentences: int = 6000) -> list[str]:
    rng = random.Random(seed)
    words_in = _WORDS.split()
    lines = []
    for _ in range(sentences):
        words = [rng.choice(words_in) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2000)))
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":", ";"])
        if rng.random() < 0.2:
            line += "\n"
        lines.append(line)
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def build_tokenizer(seed: int = 0):
    """Qwen2-shaped ``tokenizers.Tokenizer``: trained BPE + fillers + added tokens at real ids.

    Returns ``(tokenizer, number of trained tokens)``; the trained ones take ids from 0.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def skeleton(model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok

    trained = skeleton(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(_corpus(seed), trainer=trainer)
    state = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    trained_size = len(vocab)
    for i in range(trained_size, REGULAR_TOKENS):
        vocab[f"\u0120w{i}"] = i  # "Ġw<id>": decodes to " w<id>"; no merge produces it
    tok = skeleton(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.add_special_tokens([AddedToken(t, special=s, normalized=not s) for t, s in ADDED_TOKENS])
    for i, (token, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(token) == REGULAR_TOKENS + i, token
    return tok, trained_size


def _write_tokenizer(path: Path, seed: int) -> int:
    """Write the tokenizer files; return how many of its tokens are real (trained) ones."""
    tok, trained = build_tokenizer(seed)
    tok.save(str(path / "tokenizer.json"))
    special = [t for t, s in ADDED_TOKENS if s]
    _write_json(
        path / "tokenizer_config.json",
        {  # as Qwen2.5-VL-Instruct's tokenizer_config.json
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(REGULAR_TOKENS + i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": not s,
                    "rstrip": False,
                    "single_word": False,
                    "special": s,
                }
                for i, (t, s) in enumerate(ADDED_TOKENS)
            },
            "additional_special_tokens": special[1:],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return trained


# ----------------------------------------------------------------------------------- weights


def meta_model(config: dict[str, Any] | str):
    """The model for a config dict (or directory) on the meta device: shapes only, no memory."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    if isinstance(config, (str, os.PathLike)):
        hf_config = AutoConfig.from_pretrained(str(config))
    else:
        hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(hf_config)


def _hub_name(name: str) -> str:
    """The published checkpoints' tensor names (both transformers 4.5x and 5.x map them)."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def _init(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name or name.endswith("ln_q.weight"):
        return torch.ones(shape, dtype=torch.float32)
    t = torch.empty(shape, dtype=torch.float32)
    return t.normal_(0.0, 0.02 if name.endswith(".bias") else std, generator=gen)


def _shape_vocab(t: torch.Tensor, trained: int) -> torch.Tensor:
    """Tiny model only: make its random outputs look like text that sometimes ends.

    Rows of the (tied) embedding / LM head for filler and unused ids shrink, so greedy decoding
    mostly picks trained tokens (which decode to English subwords); the ``<|im_end|>`` row grows,
    so some rows stop before ``max_tokens`` and the "stop" path is exercised.
    """
    t[trained:REGULAR_TOKENS] *= FILLER_SCALE
    t[REGULAR_TOKENS + len(ADDED_TOKENS) :] *= FILLER_SCALE
    t[IM_END] *= EOS_SCALE
    return t


def _write_weights(
    path: Path, cfg: dict[str, Any], size: str, seed: int, trained: int | None
) -> None:
    """Random bf16 weights under the published tensor names, ~5 GB shards, one shard in RAM."""
    from safetensors.torch import save_file

    model = meta_model(cfg)
    tied = bool(cfg["tie_word_embeddings"])
    tensors = [
        (_hub_name(n), tuple(t.shape))
        for n, t in model.state_dict().items()
        if not (tied and n == "lm_head.weight")
    ]
    del model
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    # Wider-than-usual init for the toy model so its outputs depend on the image and prompt.
    std = TINY_STD if size == "tiny" else 0.02
    gen = torch.Generator().manual_seed(seed)
    index: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        data = {}
        for name, shape in shard:
            t = _init(name, shape, std, gen)
            if trained is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
                t = _shape_vocab(t, trained)
            data[name] = t.to(torch.bfloat16)
            del t
        save_file(data, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in data.values())
        index.update(dict.fromkeys(data, fname))
        del data
    if len(shards) > 1:
        _write_json(
            path / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": index},
        )
