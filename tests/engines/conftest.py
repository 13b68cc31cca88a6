"""Fixtures of the trtllm engine's tests: the stand-in TensorRT-LLM on sys.path, and a
tokenizer-only Qwen2.5-VL model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qvl_batch.engines.trtllm import api as trtllm_api
from qvl_batch.tooling.chat_template import CHAT_TEMPLATE

STUB_DIR = Path(__file__).resolve().parents[1] / "trtllm_stub"

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
]
WORDS = "system user assistant You are a helpful . Describe this image Caption in one word"
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE  # as shipped with Qwen/Qwen2.5-VL-*-Instruct


def make_model_dir(path: Path) -> Path:
    """A tokenizer-only 'model' dir: word-level tokenizer, Qwen specials, chat template, config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[UNK]", *dict.fromkeys(WORDS.split()), *SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": QWEN_CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "[UNK]",
        "model_max_length": 32768,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": vocab["<|image_pad|>"],
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
    }
    (path / "config.json").write_text(json.dumps(config))
    # As Qwen2.5-VL-*-Instruct ships it: both end tokens stop generation.
    eos = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny-qwen-vl-tokenizer")


def _purge_trtllm_modules() -> None:
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def stub():
    """The stand-in tensorrt_llm on sys.path for one test; removed (and unimported) after."""
    _purge_trtllm_modules()
    sys.path.insert(0, str(STUB_DIR))
    try:
        api = trtllm_api.import_trtllm()
        assert api.__version__.endswith("+stub"), "a real tensorrt_llm shadowed the stand-in"
        yield api
    finally:
        sys.path.remove(str(STUB_DIR))
        _purge_trtllm_modules()
