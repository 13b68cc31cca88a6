"""The dense vision attention (``qvl_batch.engines.hf.vision``) must give the stock tower's
embeddings for batches of equal square grids, equal non-square grids (windows of several lengths)
and mixed grids, with sdpa and eager; switch exactly the vision blocks of one model instance and
switch them back; leave flash attention stock; refuse a vision attention of another shape."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qvl_batch.engines.hf import vision as hf_vision  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(180)

PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal_patch_size x patch x patch
# (t, h, w) in patches. 448x448 -> 32x32: 16 windows of 64 patches. 308x196 -> 22x14: merged
# 11x7, not a multiple of the 4x4 merged window, so windows of 64, 48 and 36 patches.
SQUARE = [(1, 32, 32)] * 4
NON_SQUARE = [(1, 22, 14)] * 3
MIXED = [(1, 32, 32), (1, 32, 32), (1, 22, 14), (1, 8, 8), (1, 22, 14), (1, 22, 14), (1, 14, 22)]
# What every refusal says to do.
HINT = r"set engine\.hf\.vision: stock"


def _load(path: str, implementation: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation=implementation
    )
    return model.eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model):
    model = _load(tiny_model, request.param)
    assert hf_vision.vision_tower(model).config._attn_implementation == request.param
    yield model
    hf_vision.disable_dense_vision(model)


def _embeds(model, grids) -> torch.Tensor:
    """The tower's merged image embeddings for random pixel values of the given grids."""
    tower = hf_vision.vision_tower(model)
    grid_thw = torch.tensor(grids)
    generator = torch.Generator().manual_seed(len(grids))
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), PATCH_DIM, generator=generator)
    with torch.no_grad():
        out = tower(pixels, grid_thw=grid_thw)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # 4.57 | 5.x


def _lengths(cu_seqlens) -> set[int]:
    return {int(n) for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()} - {0}


def test_tiny_tower_runs_window_and_full_attention(model):
    config = hf_vision.vision_tower(model).config
    full = set(config.fullatt_block_indexes)
    assert full and set(range(config.depth)) - full


@pytest.mark.parametrize(
    "grids", [SQUARE, NON_SQUARE, MIXED], ids=["square", "non-square", "mixed"]
)
def test_dense_embeddings_equal_stock(model, grids, monkeypatch):
    assert not hf_vision.is_dense(model)
    stock = _embeds(model, grids)

    # Count the batched attention calls and the segment lengths each block was given.
    calls, seen = [], []
    attention_function = hf_vision._attention_function
    plan = hf_vision._Plan

    def counting_function(*args):
        function = attention_function(*args)

        def call(module, q, *rest, **kwargs):
            calls.append(tuple(q.shape))
            return function(module, q, *rest, **kwargs)

        return call

    def recording_plan(cu_seqlens):
        seen.append(_lengths(cu_seqlens))
        return plan(cu_seqlens)

    monkeypatch.setattr(hf_vision, "_attention_function", counting_function)
    monkeypatch.setattr(hf_vision, "_Plan", recording_plan)
    config = hf_vision.vision_tower(model).config
    try:
        assert hf_vision.enable_dense_vision(model) == config.depth
        calls.clear()  # enable's self-check
        seen.clear()
        dense = _embeds(model, grids)
    finally:
        hf_vision.disable_dense_vision(model)

    assert dense.shape == stock.shape
    assert torch.allclose(dense, stock, atol=1e-5, rtol=0), (dense - stock).abs().max()
    # One plan per cu_seqlens tensor (window, full), one call per distinct length and block.
    assert len(seen) == 2
    window, full = seen
    blocks = {"window": config.depth - len(config.fullatt_block_indexes)}
    blocks["full"] = len(config.fullatt_block_indexes)
    assert len(calls) == blocks["window"] * len(window) + blocks["full"] * len(full)
    assert len(calls) < len(grids) * config.depth  # fewer calls than images, let alone windows
    if grids is NON_SQUARE:
        assert len(window) > 1  # windows of several lengths ran as several groups
    if grids is SQUARE:
        assert len(calls) == config.depth
    assert sum(q[0] for q in calls) > len(calls)  # batched: several segments per call


def test_enable_counts_blocks_and_disable_restores_stock(model, tiny_model):
    tower = hf_vision.vision_tower(model)
    stock_forward = type(tower.blocks[0].attn).forward
    other = _load(tiny_model, "sdpa")  # another model in the process must stay stock
    try:
        assert hf_vision.enable_dense_vision(model) == len(tower.blocks) == tower.config.depth
        assert hf_vision.enable_dense_vision(model) == len(tower.blocks)  # idempotent
        for block in tower.blocks:
            assert "forward" in vars(block.attn)
            assert block.attn.forward.__func__.stock.__func__ is stock_forward
        assert type(tower.blocks[0].attn).forward is stock_forward
        assert set(vars(tower)) & set(hf_vision._TOWER_OVERRIDES)  # positions tiled
        assert not hf_vision.is_dense(other)
        assert all("forward" not in vars(b.attn) for b in hf_vision.vision_tower(other).blocks)
    finally:
        assert hf_vision.disable_dense_vision(model) == len(tower.blocks)
    assert not hf_vision.is_dense(model)
    assert not set(vars(tower)) & set(hf_vision._TOWER_OVERRIDES)
    for block in tower.blocks:
        assert "forward" not in vars(block.attn)
        assert block.attn.forward.__func__ is stock_forward
    assert hf_vision.disable_dense_vision(model) == 0


def test_tiled_positions_and_windows_equal_stock(model):
    """Rotary positions and window index computed once per run of equal grids and tiled are the
    ones the stock tower computes image by image (4.57: its methods; 5.x: vision_utils)."""
    tower = hf_vision.vision_tower(model)
    grid_thw = torch.tensor(MIXED + SQUARE)
    if "rot_pos_emb" in vars(type(tower)):  # 4.57
        stock = (
            type(tower).rot_pos_emb(tower, grid_thw),
            *type(tower).get_window_index(tower, grid_thw),
        )
        hf_vision.enable_dense_vision(model)
        try:
            tiled = (tower.rot_pos_emb(grid_thw), *tower.get_window_index(grid_thw))
        finally:
            hf_vision.disable_dense_vision(model)
    else:  # 5.x: what the tower's forward is given as precomputed kwargs
        from transformers import vision_utils

        size, window = tower.spatial_merge_size, (tower.window_size, tower.patch_size)
        index, cu = vision_utils.get_vision_window_index(grid_thw, size, *window)
        stock = (vision_utils.get_vision_position_ids(grid_thw, size), index, cu.tolist())
        tiled = hf_vision._tiled(
            tower,
            grid_thw,
            lambda one: vision_utils.get_vision_position_ids(one, size),
            lambda one: vision_utils.get_vision_window_index(one, size, *window),
        )
    assert torch.equal(tiled[0], stock[0])
    assert torch.equal(tiled[1], stock[1])
    assert list(tiled[2]) == list(stock[2])


def test_flash_attention_is_left_stock(tiny_model):
    model = _load(tiny_model, "sdpa")
    hf_vision.vision_tower(model).config._attn_implementation = "flash_attention_2"
    assert hf_vision.enable_dense_vision(model) == 0
    assert not hf_vision.is_dense(model)


def _no_qkv(attn):
    del attn.qkv


def _other_class(attn):
    class Qwen2_5_VLVisionAttention(type(attn)):  # same name and attributes, another signature
        def forward(self, hidden_states, cu_seqlens, rotary_pos_emb, position_embeddings=None):
            return super().forward(hidden_states, cu_seqlens, position_embeddings=None)

    attn.__class__ = Qwen2_5_VLVisionAttention


def _renamed(attn):
    attn.__class__ = type("VisionSdpaAttention", (type(attn),), {})


def _unfused(attn):
    attn.qkv = torch.nn.Linear(attn.qkv.in_features, attn.qkv.in_features)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (_no_qkv, "no Linear attribute 'qkv'"),
        (_other_class, "forward takes"),
        (_renamed, "is VisionSdpaAttention"),
        (_unfused, "expected fused q/k/v"),
    ],
    ids=["no-qkv", "signature", "class", "unfused-qkv"],
)
def test_unknown_attention_shape_raises(tiny_model, change, what):
    model = _load(tiny_model, "sdpa")
    tower = hf_vision.vision_tower(model)
    change(tower.blocks[-1].attn)
    with pytest.raises(ValueError, match=HINT) as raised:
        hf_vision.enable_dense_vision(model)
    assert what in str(raised.value)
    assert f"transformers {transformers.__version__}" in str(raised.value)
    assert not hf_vision.is_dense(model)  # nothing switched, not even the blocks before


def test_self_check_catches_a_forward_that_differs(tiny_model, monkeypatch):
    model = _load(tiny_model, "sdpa")
    make_forward = hf_vision._make_forward

    def make_wrong_forward(attn, modeling, cache):
        forward = make_forward(attn, modeling, cache)
        return lambda self, *args, **kwargs: forward(self, *args, **kwargs) + 0.1

    monkeypatch.setattr(hf_vision, "_make_forward", make_wrong_forward)
    with pytest.raises(ValueError, match="differs from the stock one"):
        hf_vision.enable_dense_vision(model)
    assert not hf_vision.is_dense(model)  # switched back


def test_not_qwen_vl_raises():
    with pytest.raises(ValueError, match=HINT):
        hf_vision.enable_dense_vision(torch.nn.Linear(2, 2))
    assert hf_vision.disable_dense_vision(torch.nn.Linear(2, 2)) == 0, "nothing to undo"


def test_the_engine_runs_the_dense_tower_when_the_job_says_so(tiny_model, monkeypatch, caplog):
    """engine.hf.vision=dense switches the loaded model's tower; greedy fp32 answers equal the
    stock tower's; set_modes(vision=...) switches back on the same model."""
    from PIL import Image

    from qvl_batch.config import Config, EngineConfig, SamplingConfig
    from qvl_batch.engines.base import Request
    from qvl_batch.engines.build import make_batch_engine
    from qvl_batch.engines.hf.settings import HFEngineConfig
    from qvl_batch.engines.hf.vision import is_dense

    cfg = Config(
        engine=EngineConfig(
            name="hf", model=tiny_model, device="cpu", hf=HFEngineConfig(vision="dense")
        ),
        sampling=SamplingConfig(max_tokens=6),
    )
    engine = make_batch_engine(cfg)
    try:
        assert is_dense(engine.model)
        rng = torch.Generator().manual_seed(3)
        requests = []
        for i, (w, h) in enumerate([(112, 84), (112, 84), (56, 140)]):  # two sizes: a mixed batch
            pixels = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8)
            image = Image.fromarray(pixels.numpy())
            requests.append(Request(("u", i), f"r{i}", "Describe.", None, image, "", 0, 0))
        dense = [(r.text, r.output_tokens) for r in engine.generate(requests)]
        engine.set_modes(vision="stock")
        assert not is_dense(engine.model)
        stock = [(r.text, r.output_tokens) for r in engine.generate(requests)]
        assert dense == stock
        engine.set_modes(vision="auto")  # the default: dense where the tower is a known shape
        assert is_dense(engine.model) and engine.vision == "dense"
        engine.set_modes(vision="stock")

        def unknown(model):
            raise ValueError("dense vision attention: transformers 9.9: a different shape")

        monkeypatch.setattr(hf_vision, "enable_dense_vision", unknown)
        with caplog.at_level(logging.WARNING):
            engine.set_modes(vision="auto")  # falls back, warned
        assert engine.vision == "stock" and "stays stock" in caplog.text
        with pytest.raises(ValueError, match="a different shape"):
            engine.set_modes(vision="dense")  # asked for explicitly: refused
    finally:
        engine.close()
