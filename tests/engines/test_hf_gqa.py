"""The grouped decode attention (``qvl_batch.engines.hf.gqa``, ``engine.hf.decode_attention``)
must give transformers' own SDPA output for one query a head (padding masks shared by the heads
or one a head, none), without copying the keys and values out to every query head; leave
prefill to the stock function; switch exactly the text model of one loaded model, both ways; and
give the stock engine's greedy answers token for token in float32, eager and compiled (CPU, the
tiny model: 4 query heads over 2 KV heads)."""

from __future__ import annotations

import logging
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.integrations import sdpa_attention  # noqa: E402

from qvl_batch.engines.build import make_batch_engine  # noqa: E402
from qvl_batch.engines.hf import gqa as hf_gqa  # noqa: E402

from ..engine_inputs import engine_requests, small_engine_config  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(300)

HEADS, KV_HEADS, DIM, BATCH, KEYS = 8, 2, 16, 3, 21


def _module(groups: int = HEADS // KV_HEADS):
    return types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)


def _qkv(q_len: int = 1, kv_heads: int = KV_HEADS):
    g = torch.Generator().manual_seed(q_len)
    query = torch.randn(BATCH, q_len, HEADS, DIM, generator=g).transpose(1, 2)  # as projected
    key = torch.randn(BATCH, kv_heads, KEYS, DIM, generator=g)
    value = torch.randn(BATCH, kv_heads, KEYS, DIM, generator=g)
    return query, key, value


def _padding(per_head: bool = False) -> torch.Tensor:
    """Left padding of 0, 5 and 11 keys (bool, True = attend), shared by the heads or not."""
    mask = torch.ones(BATCH, HEADS if per_head else 1, 1, KEYS, dtype=torch.bool)
    for row, pad in enumerate((0, 5, 11)):
        mask[row, ..., :pad] = False
    if per_head:
        mask[1, 3, 0, 6:8] = False  # one head of one row sees less
    return mask


def _stock(*args, **kwargs):
    return sdpa_attention.sdpa_attention_forward(*args, **kwargs)[0]


@pytest.mark.parametrize(
    "mask",
    [_padding(), _padding(per_head=True), _padding().float().log(), None],
    ids=["bool-shared", "bool-per-head", "additive", "none"],
)
def test_one_query_a_head_equals_stock_without_copying_kv(mask, monkeypatch):
    query, key, value = _qkv()
    want = _stock(_module(), query, key, value, mask, scaling=DIM**-0.5)

    def no_copy(*args, **kwargs):
        raise AssertionError("repeat_kv: the keys and values were copied out per query head")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copy)
    got, weights = hf_gqa.grouped_decode_attention(
        _module(), query, key, value, mask, scaling=DIM**-0.5
    )
    assert weights is None and got.shape == want.shape == (BATCH, 1, HEADS, DIM)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_query_head_attends_only_to_its_own_kv_head():
    """Grouping is heads [g*k, g*k + g) on KV head k (transformers' repeat_kv order): zeroing
    one KV head's values zeroes exactly its query heads' outputs."""
    query, key, value = _qkv()
    value[:, 1] = 0
    out, _ = hf_gqa.grouped_decode_attention(_module(), query, key, value, _padding())
    groups = HEADS // KV_HEADS
    assert torch.all(out[:, 0, groups:] == 0) and torch.all(out[:, 0, :groups].abs().sum(-1) > 0)


def test_prefill_and_ungrouped_heads_run_the_stock_function(monkeypatch):
    calls = []
    stock = sdpa_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return stock(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    query, key, value = _qkv(q_len=4)
    causal = torch.ones(BATCH, 1, 4, KEYS, dtype=torch.bool).tril(diagonal=KEYS - 4)
    got, _ = hf_gqa.grouped_decode_attention(_module(), query, key, value, causal)
    assert torch.equal(got, stock(_module(), query, key, value, causal)[0])
    query, key, value = _qkv(kv_heads=HEADS)  # one KV head a query head: nothing to group
    hf_gqa.grouped_decode_attention(_module(groups=1), query, key, value, None)
    assert calls == [(BATCH, HEADS, 4, DIM), (BATCH, HEADS, 1, DIM)]


# --------------------------------------------------------------------- on a loaded model
def _answers(engine, requests) -> list[tuple]:
    return [(r.text, r.output_tokens, r.finish_reason) for r in engine.generate(requests)]


@pytest.fixture
def seen(monkeypatch):
    """A spy registered under the grouped name: the query lengths it is called with."""
    from transformers import AttentionInterface

    seen: list[int] = []

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return hf_gqa.grouped_decode_attention(module, query, *args, **kwargs)

    register = hf_gqa._register

    def register_spy():
        register()  # the mask function too
        AttentionInterface.register(hf_gqa.NAME, spy)

    monkeypatch.setattr(hf_gqa, "_register", register_spy)
    yield seen
    register()


def test_engine_answers_equal_stock_and_the_switch_goes_both_ways(tiny_model, seen):
    # (auto is stock with the eager decode: test_hf_decode checks that)
    engine = make_batch_engine(small_engine_config(tiny_model, decode_attention="grouped"))
    try:
        assert engine.decode_attention == "grouped" and hf_gqa.is_grouped(engine.model)
        assert engine.modes()["decode_attention"] == "grouped"
        vision = hf_gqa._text_configs(engine.model)[0] is not engine.model.config.vision_config
        assert vision, "the vision tower's config is not switched"
        assert engine.model.config.vision_config._attn_implementation == "sdpa"
        for requests in (engine_requests(4), engine_requests(3, prompt="Hi"), engine_requests(1)):
            grouped = _answers(engine, requests)
            engine.set_modes(decode_attention="stock")
            assert not hf_gqa.is_grouped(engine.model)
            assert engine.modes()["decode_attention"] == "stock"
            calls = len(seen)
            assert _answers(engine, requests) == grouped
            assert len(seen) == calls, "stock ran the grouped function"
            engine.set_modes(decode_attention="grouped")
        assert 1 in seen and any(n > 1 for n in seen), "decode steps grouped, prefill passed on"
    finally:
        engine.close()


def test_compiled_grouped_decode_equals_eager_stock(tiny_model, seen):
    """The compiled decode (static caches, torch.compile) with the grouped attention traced into
    its graph gives the eager stock engine's tokens."""
    compiled = make_batch_engine(
        small_engine_config(tiny_model, compile=True, decode_attention="grouped")
    )
    stock = make_batch_engine(
        small_engine_config(tiny_model, compile=False, decode_attention="stock")
    )
    try:
        for requests in (engine_requests(4), engine_requests(3, prompt="Hi")):
            assert _answers(compiled, requests) == _answers(stock, requests)
            assert compiled.last_stages()["batch"] == 4
        assert 1 in seen, "the compiled decode traced the grouped function"
    finally:
        compiled.close()
        stock.close()


def test_eager_attention_stays_stock_and_unknown_shapes_refuse(tiny_model, caplog):
    engine = make_batch_engine(small_engine_config(tiny_model, attn_implementation="eager"))
    try:
        assert engine.decode_attention == "stock" and not hf_gqa.is_grouped(engine.model)
    finally:
        engine.close()
    with pytest.raises(ValueError, match=r"set engine\.hf\.decode_attention: stock"):
        hf_gqa.enable_grouped_decode(torch.nn.Linear(2, 2))
    engine = make_batch_engine(small_engine_config(tiny_model))
    try:
        engine.model.model.language_model = None  # a text model where it is not looked for
        with caplog.at_level(logging.WARNING):
            engine.set_modes(decode_attention="auto")
        assert engine.decode_attention == "stock" and "stays stock" in caplog.text
        with pytest.raises(ValueError, match="no text model"):
            engine.set_modes(decode_attention="grouped")
        engine.set_modes(decode_attention="stock")  # nothing to undo
        assert engine.decode_attention == "stock"
    finally:
        engine.close()
