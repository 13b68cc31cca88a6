"""Random-weight Qwen2.5-VL checkpoints: the published shapes; a tiny one that loads like real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qvl_batch.tooling import modelgen  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(120)

SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|file_sep|>": 151664,
}


def _image(width: int, height: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("size", "params", "fields"),
    [
        (
            "3b",
            3_754_622_976,
            {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936},
        ),
        (
            "7b",
            8_292_166_656,
            {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
        ),
    ],
)  # fmt: skip
def test_published_configs_have_published_shapes(tmp_path, size, params, fields):
    cfg = modelgen.model_config(size)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2_5_VLConfig"
    text = loaded.text_config
    for key, value in fields.items():
        assert getattr(text, key) == value, key
    assert text.max_position_embeddings == 128000
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling  # 5.x | 4.x
    assert rope["mrope_section"] == [16, 24, 24]
    assert rope.get("rope_theta", getattr(text, "rope_theta", None)) == 1000000.0
    assert loaded.tie_word_embeddings is (size == "3b")
    vision = loaded.vision_config
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (
        32,
        1280,
        3420,
        16,
    )
    assert vision.out_hidden_size == fields["hidden_size"]
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert (vision.window_size, vision.patch_size, vision.spatial_merge_size) == (112, 14, 2)
    assert (vision.temporal_patch_size, vision.tokens_per_second) == (2, 2)
    ids = (loaded.image_token_id, loaded.video_token_id)
    ids += (loaded.vision_start_token_id, loaded.vision_end_token_id)
    assert ids == (151655, 151656, 151652, 151653)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (151643, 151645)

    model = modelgen.meta_model(str(tmp_path))  # shapes only: no memory
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.01
    assert count == params  # exactly the published safetensors total_size / 2


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size must be one of"):
        modelgen.make_test_model(str(tmp_path), "13b")


def test_tiny_model_directory_looks_like_a_real_checkpoint(tiny_model):
    path = Path(tiny_model)
    names = {p.name for p in path.iterdir()}
    expected = {"config.json", "generation_config.json", "preprocessor_config.json"}
    expected |= {"tokenizer.json", "tokenizer_config.json", "chat_template.json"}
    assert expected | {"model.safetensors"} <= names
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total < 40 * 1024 * 1024, f"tiny model is {total / 1e6:.1f} MB"

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is True
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert sum(cfg["rope_scaling"]["mrope_section"]) == head_dim // 2
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"]) == (3136, 12845056, 14)

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    assert len(tok) == 151665
    for token, token_id in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "Describe this image, please: 12 dogs?"
    ids = tok(text)["input_ids"]
    assert len(ids) < len(text) / 2, "a trained BPE, not bytes"
    assert tok.decode(ids) == text
    assert max(ids) < 151643
    # Specials inside text are single tokens, as in Qwen's tokenizer.
    assert tok("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"] == [
        151652,
        151655,
        151653,
    ]


def test_tiny_model_chat_template_is_qwens(tiny_model):
    from qvl_batch.engines.hf.loading import load_processor

    processor = load_processor(tiny_model)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
    default = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert default == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    own = processor.apply_chat_template([system, user], tokenize=False)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not own.endswith("assistant\n")


def test_tiny_model_loads_and_generates_like_real_weights(tiny_model):
    from safetensors.torch import load_file

    from qvl_batch.engines.hf.loading import load_processor

    cls = transformers.Qwen2_5_VLForConditionalGeneration
    model, info = cls.from_pretrained(tiny_model, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    auto = transformers.AutoModelForImageTextToText.from_pretrained(tiny_model)
    assert type(auto) is cls
    saved = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert "model.embed_tokens.weight" in saved and "visual.patch_embed.proj.weight" in saved
    assert "lm_head.weight" not in saved  # tied, as the published 3B
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed, saved["model.embed_tokens.weight"].float())
    assert torch.equal(model.lm_head.weight, embed)

    try:
        processor = transformers.AutoProcessor.from_pretrained(tiny_model)
    except ImportError as exc:  # no torchvision: Qwen2.5-VL's video processor needs it
        assert "torchvision" in str(exc).lower()
        processor = load_processor(tiny_model)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.image_processor.__class__.__name__.startswith("Qwen2VLImageProcessor")

    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}],
    }
    text = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    images = [_image(84, 56, 1), _image(56, 112, 2)]
    inputs = processor(text=[text, text], images=images, padding=True, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 8
    assert not torch.equal(new[0], new[1]), "outputs should depend on the image"


def test_sharded_writer_round_trips(tmp_path, tiny_model, monkeypatch):
    """The 3b/7b path (several shards + index) on the tiny model: same tensors as one file."""
    from safetensors.torch import load_file

    monkeypatch.setattr(modelgen, "SHARD_BYTES", 4 * 1000**2)
    out = modelgen.make_test_model(str(tmp_path / "sharded"), "tiny", seed=0)
    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    whole = load_file(str(Path(tiny_model) / "model.safetensors"))
    parts: dict = {}
    for name in shards:
        parts.update(load_file(str(Path(out) / name)))
    assert parts.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in whole.values())
    _, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
