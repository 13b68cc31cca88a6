"""The transformers engine's decode side on CPU with the tiny random Qwen2.5-VL: the stage
clocks (vision tower, prefill, decode), benchmark answer lengths
(``engine.benchmark.answer_lengths``) and the compiled decode (``engine.hf.compile``: static
cache + torch.compile, greedy output equal to eager token for token)."""

from __future__ import annotations

import logging
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qvl_batch.config import BenchmarkKnobs, Config, EngineConfig, SamplingConfig  # noqa: E402
from qvl_batch.engines.build import make_batch_engine  # noqa: E402
from qvl_batch.engines.hf import decode as hf_decode  # noqa: E402
from qvl_batch.engines.hf import engine as hf  # noqa: E402
from qvl_batch.engines.hf import vision as hf_vision  # noqa: E402
from qvl_batch.engines.hf.settings import HFEngineConfig  # noqa: E402
from qvl_batch.engines.lengths import answer_length  # noqa: E402

from ..engine_inputs import engine_requests, small_engine_config  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(300)


def _engine(model: str, max_tokens: int, answer_lengths: str = "", **hf_knobs):
    return make_batch_engine(
        Config(
            engine=EngineConfig(
                name="hf",
                model=model,
                device="cpu",
                hf=HFEngineConfig(**hf_knobs),
                benchmark=BenchmarkKnobs(answer_lengths),
            ),
            sampling=SamplingConfig(max_tokens=max_tokens),
        )
    )


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = _engine(tiny_model, 16)
    yield eng
    eng.close()


# ------------------------------------------------------------------------------ stage clocks


def test_vision_tower_is_found(engine):
    tower = hf_vision.vision_tower(engine.model)  # the one lookup the clock hooks
    assert tower is not None and "Vision" in type(tower).__name__
    assert tower is engine.model.model.visual


def test_stage_clocks_split_generate(engine):
    engine.reset_stage_times()
    engine.generate(engine_requests(3))
    last = engine.last_stages()
    assert last["rows"] == 3 and 1 <= last["steps"] <= 16
    for stage in ("vision", "prefill", "decode", "generate", "inputs", "outputs"):
        assert last[stage] > 0, stage
    assert last["vision"] < last["prefill"]  # the first forward holds the vision tower
    # prefill (vision included) + decode is generate, but for what runs after the end mark
    assert last["prefill"] + last["decode"] == pytest.approx(last["generate"], rel=0.05, abs=0.02)
    totals = engine.stage_times()
    assert {"inputs", "generate", "outputs", "vision", "prefill", "decode"} <= set(totals)
    assert totals["decode"] == pytest.approx(last["decode"])
    engine.generate(engine_requests(2))
    assert engine.stage_times()["decode"] > totals["decode"]  # clocks add up over batches
    engine.reset_stage_times()
    assert set(engine.stage_times().values()) == {0.0}


def test_decode_time_grows_with_max_tokens(tiny_model):
    """Same rows, 16 vs 64 new tokens: prefill is the same work, decode runs longer. The best of
    three interleaved runs each, as the CPU may be shared."""
    requests = engine_requests(2, prompt="Write a long story about this picture.")
    long = _engine(tiny_model, 64, answer_lengths="fixed:64")
    short = _engine(tiny_model, 16, answer_lengths="fixed:16")
    runs: dict[str, list[dict]] = {"long": [], "short": []}
    try:
        for eng in (long, short):  # a first call pays one-time costs
            eng.generate(requests)
        for _ in range(3):
            for name, eng in (("long", long), ("short", short)):
                eng.generate(requests)
                runs[name].append(eng.last_stages())
    finally:
        long.close()
        short.close()
    s_steps = {r["steps"] for r in runs["short"]}
    l_steps = {r["steps"] for r in runs["long"]}
    assert s_steps == {16} and min(l_steps) >= 32  # the tiny model may stop on its own
    best = {name: min(r["decode"] for r in rs) for name, rs in runs.items()}
    assert best["long"] > 1.3 * best["short"]


# ---------------------------------------------------------------------------- answer lengths


def test_rows_end_at_their_drawn_lengths(tiny_model):
    """uniform:3:14 over six rows of one batch: each row's answer is its drawn length (unless the
    tiny model's own EOS comes first), and the batch decodes to its longest row, not max_tokens."""
    spec = "uniform:3:14"
    requests = engine_requests(6)
    drawn = {r.key: answer_length(spec, r.row_id) for r in requests}
    assert len(set(drawn.values())) > 2  # rows of one batch end at different steps
    eng = _engine(tiny_model, 40, answer_lengths=spec)
    free = _engine(tiny_model, 40)  # the model decides: the reference tokens
    try:
        results = {r.key: r for r in eng.generate(requests)}
        steps = eng.last_stages()["steps"]
        reference = {r.key: r for r in free.generate(requests)}
    finally:
        eng.close()
        free.close()
    ruled = 0
    for key, want in drawn.items():
        got, ref = results[key], reference[key]
        assert got.error_code is None and got.finish_reason == "stop"
        if ref.finish_reason == "stop" and ref.output_tokens <= want:  # its EOS came first
            assert (got.output_tokens, got.text) == (ref.output_tokens, ref.text)
        else:
            ruled += 1
            assert got.output_tokens == want, key
            assert ref.text.startswith(got.text)  # the same greedy tokens, cut at its length
    assert ruled >= 3
    assert steps == max(r.output_tokens for r in results.values()) < 40


def test_fixed_length_is_exact_and_capped_by_max_tokens(tiny_model):
    requests = engine_requests(3, prompt="Write a long story about this picture.")
    eng = _engine(tiny_model, 8, answer_lengths="fixed:5")
    capped = _engine(tiny_model, 4, answer_lengths="fixed:5")
    try:
        fixed = eng.generate(requests)
        cut = capped.generate(requests)
    finally:
        eng.close()
        capped.close()
    assert {(r.output_tokens, r.finish_reason) for r in fixed} <= {(5, "stop")} | {
        (n, "stop")
        for n in range(1, 5)  # the tiny model's own EOS, if it came first
    }
    assert sum(r.output_tokens == 5 for r in fixed) >= 2
    # a drawn length past max_tokens: cut by max_tokens, as any answer is
    assert {(r.output_tokens, r.finish_reason) for r in cut if r.finish_reason == "length"} == {
        (4, "length")
    }


def test_answer_lengths_config_is_validated():
    from qvl_batch.errors import ConfigError
    from qvl_batch.run.validate import load_job

    base = ["input.paths=[x.parquet]", "output.path=o", "engine.name=hf", "engine.model=m"]
    assert load_job(None, base).engine.benchmark.answer_lengths == ""  # off: the model decides
    spec = "engine.benchmark.answer_lengths=lognormal:110:300"
    assert load_job(None, [*base, spec]).engine.benchmark.answer_lengths
    with pytest.raises(ConfigError, match=r"engine\.benchmark\.answer_lengths"):
        load_job(None, [*base, "engine.benchmark.answer_lengths=uniform:9:3"])
    with pytest.raises(ConfigError, match=r"engine\.hf: unknown key\(s\) \['answer_lengths'\]"):
        load_job(None, [*base, "engine.hf.answer_lengths=fixed:8"])
    with pytest.raises(ConfigError, match=r"engine\.hf\.vision"):
        HFEngineConfig(vision="fast")


# ---------------------------------------------------------------------------- compiled decode


@pytest.fixture(scope="module")
def compiled(tiny_model):
    """The engine with ``engine.hf.compile`` on, warmed up (every rung compiled)."""
    from torch._dynamo.utils import counters

    # compile_after 1: the warm-up's shape compiles at once (the default waits for a 2nd batch)
    eng = make_batch_engine(small_engine_config(tiny_model, compile=True, compile_after=1))
    torch._dynamo.reset()  # a test module before this one may have compiled these shapes
    counters.clear()
    t0 = time.perf_counter()
    eng.warmup(4)
    eng.compile_s = time.perf_counter() - t0  # reported by the test below
    eng.graphs_after_warmup = counters["stats"]["unique_graphs"]
    yield eng
    eng.close()


def test_compiled_sizes_its_caches_from_the_batch_and_rungs_from_the_job(compiled):
    assert compiled.compiled and compiled._rungs == [1, 2, 4]
    modes = compiled.modes()
    assert (modes["decode"], modes["device"], modes["static_cache_gib"]) == (
        "compiled",
        "cpu",
        None,
    )
    assert hf_decode.batch_rungs(32) == [4, 8, 16, 32] and hf_decode.batch_rungs(6) == [1, 2, 3, 6]
    # lengths on the grid (two per octave from CACHE_STEP = 128), capped by the positions
    lengths = [hf_decode.static_cache_len(n, 4096) for n in (1, 128, 129, 200, 600, 1100, 5000)]
    assert lengths == [128, 128, 192, 256, 768, 1536, 4096]
    # warm-up ran the full batch's rung at its image's length (16 vision tokens + text + 12 new)
    assert compiled.caches.shapes() == [(4, 128)]
    # one decode graph: the full batch's rung (a smaller rung compiles when first met)
    assert compiled.graphs_after_warmup == 1, compiled.compile_s
    print(f"\nwarm-up compile of one rung: {compiled.compile_s:.1f} s")


def test_compiled_greedy_output_equals_eager(compiled, tiny_model):
    """float32 greedy, token for token: batches of 3 (padded to 4 with a dummy row: the warm-up's
    graph) and 1 (a new rung: one graph more), twice each; different prompt widths."""
    from torch._dynamo.utils import counters

    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    try:
        for requests in (engine_requests(3), engine_requests(1, prompt="Hi")) * 2:
            want = {r.key: r for r in eager.generate(requests)}
            got = {r.key: r for r in compiled.generate(requests)}
            assert compiled.last_stages()["batch"] in (1, 4)
            for key, ref in want.items():
                assert (got[key].text, got[key].output_tokens, got[key].finish_reason) == (
                    ref.text,
                    ref.output_tokens,
                    ref.finish_reason,
                ), key
                assert got[key].prompt_tokens == ref.prompt_tokens
            assert any(r.finish_reason == "length" for r in want.values()) or len(want) == 1
    finally:
        eager.close()
    assert counters["stats"]["unique_graphs"] == compiled.graphs_after_warmup + 1
    assert compiled.caches.shapes() == [(1, 128), (4, 128)]


def _held_bytes(eng) -> int:
    """What the engine's static caches really hold: their key and value tensors' bytes."""
    total = 0
    for cache in eng.caches.by_shape.values():
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
    return total


def test_cache_memory_is_counted_as_the_caches_hold_it(compiled):
    """The cap's arithmetic (rows x length x layers x KV heads x head size x 2 x dtype) against
    the tensors transformers allocated for every cache made so far."""
    assert compiled.caches.shapes(), "the warm-up made a cache"
    assert compiled.caches.held_bytes == _held_bytes(compiled) > 0
    assert compiled.caches.cap_bytes is None, "no cap on the CPU by default"


def test_a_batch_whose_cache_would_pass_the_cap_runs_eagerly_with_the_same_output(
    compiled, tiny_model, caplog
):
    """A mixed-size job's caches stay within ``engine.hf.static_cache_gib``: a batch of a new
    shape that would pass it runs eagerly (warned once per shape), no cache or graph is made, and
    its answers equal the eager engine's; shapes that have a cache keep running compiled."""
    from torch._dynamo.utils import counters

    caches = compiled.caches
    shapes, graphs = caches.shapes(), counters["stats"]["unique_graphs"]
    caches.cap_bytes = caches.held_bytes  # no room for one more
    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    try:
        with caplog.at_level(logging.WARNING, logger=hf_decode.__name__):
            for _ in range(2):
                requests = engine_requests(2)  # rung 2: no cache of that shape yet
                want = [(r.text, r.output_tokens) for r in eager.generate(requests)]
                assert [(r.text, r.output_tokens) for r in compiled.generate(requests)] == want
        assert caplog.text.count("would pass the caches' cap") == 1, caplog.text
        assert caches.eager_batches == 2 and caches.shapes() == shapes
        assert compiled.generate(engine_requests(3))  # (4, 128): has its cache
        assert caches.shapes() == shapes
        assert caches.eager_batches == 2
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        caches.cap_bytes = None
        eager.close()


def test_static_cache_cap_from_the_config(tiny_model):
    from qvl_batch.errors import ConfigError

    cfg = small_engine_config(tiny_model, compile=True, static_cache_gib=0.5)
    eng = make_batch_engine(cfg)
    try:
        assert eng.caches.cap_bytes == 2**29
    finally:
        eng.close()
    assert hf_decode.default_cap(torch.device("cpu")) is None
    with pytest.raises(ConfigError, match=r"engine\.hf\.static_cache_gib"):
        HFEngineConfig(static_cache_gib=-1)


def test_compiled_with_answer_lengths_and_a_batch_past_the_rungs(compiled, tiny_model, caplog):
    """Answer lengths end rows under the compiled decode too; a longer batch gets a longer
    cache (the next multiple of 128); a batch past the largest rung runs eagerly, warned."""
    compiled.answer_lengths = "fixed:3"
    try:
        results = compiled.generate(engine_requests(2))
        assert all(r.output_tokens <= 3 and r.finish_reason == "stop" for r in results)
        assert compiled._rung(1, 300) == (1, 384) and compiled._rung(3, 40) == (4, 128)
        with caplog.at_level(logging.WARNING, logger=hf.__name__):
            got = compiled.generate(engine_requests(5))  # the rungs are 1, 2, 4
        assert len(got) == 5 and all(r.error_code is None for r in got)
        assert "runs eagerly" in caplog.text
    finally:
        compiled.answer_lengths = ""


def test_compile_refuses_old_transformers_and_device_maps():
    with pytest.raises(ValueError, match=r"engine\.hf\.compile: transformers 4\.56\.2 is older"):
        hf_decode.check_compile_supported("4.56.2", 0)
    with pytest.raises(ValueError, match=r"engine\.hf\.compile: .*2 GPUs"):
        hf_decode.check_compile_supported(transformers.__version__, 2)
    hf_decode.check_compile_supported("4.57.3", 1)
    hf_decode.check_compile_supported("5.0.0.dev0", 0)


def test_compile_auto_is_on_only_where_it_is_supported(tiny_model):
    supported = hf_decode.compile_supported
    assert supported(1, "4.57.3") and supported(0, "5.1.0")
    assert not supported(1, "4.56.2") and not supported(2, "5.1.0")
    cfg = small_engine_config(tiny_model, compile=False)
    cfg.engine.hf.compile = None  # auto: this engine is on the CPU, so eager
    eng = make_batch_engine(cfg)
    try:
        assert eng.compiled is False
    finally:
        eng.close()


def test_compile_switches_off_and_on_on_one_engine(compiled, tiny_model):
    """The benchmark's switch: off clears transformers' compile_config (no per-call warning,
    eager caches), on restores it and reuses the graphs compiled before."""
    compiled.set_modes(compile=False)
    try:
        assert compiled.model.generation_config.compile_config is None
        eager = [(r.text, r.output_tokens) for r in compiled.generate(engine_requests(3))]
    finally:
        compiled.set_modes(compile=True)
    assert compiled.model.generation_config.compile_config is compiled._compile_config
    again = [(r.text, r.output_tokens) for r in compiled.generate(engine_requests(3))]
    assert again == eager


def _square_requests(side: int, n: int, first: int) -> list:
    """``n`` requests of one random ``side`` x ``side`` image size (keys from ``first``)."""
    import numpy as np
    from PIL import Image

    from qvl_batch.engines.base import Request

    out = []
    for i in range(first, first + n):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        tokens = (side // 28) ** 2
        out.append(Request(("u", i), f"r{i}", "Describe.", None, image, "0" * 64, tokens, 0))
    return out


def test_a_mixed_size_job_compiles_at_most_its_bounded_shapes(tiny_model, caplog):
    """Batches of three image sizes need three cache lengths (128, 192, 256 tokens) at one
    rung; with engine.hf.compile_shapes=2 two are compiled (timed, before their batch) and the
    third runs eagerly, warned once; every answer equals the eager engine's."""
    from torch._dynamo.utils import counters

    sizes = (112, 308, 392)  # 16, 121, 196 vision tokens: + text + 12 new -> 3 lengths
    compiled = make_batch_engine(
        small_engine_config(tiny_model, compile=True, compile_shapes=2, compile_after=1)
    )
    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    counters.clear()
    try:
        with caplog.at_level(logging.WARNING, logger=hf_decode.__name__):
            for round_ in range(2):
                for k, side in enumerate(sizes):
                    requests = _square_requests(side, 4, 10 * k + 100 * round_)
                    want = [(r.text, r.output_tokens) for r in eager.generate(requests)]
                    got = [(r.text, r.output_tokens) for r in compiled.generate(requests)]
                    assert got == want, side
        assert compiled.caches.shapes() == [(4, 128), (4, 192)]
        assert compiled.modes()["compiled_shapes"] == [[4, 128], [4, 192]]
        assert compiled.caches.eager_batches == 2  # the 392 px batches, both rounds
        assert caplog.text.count("engine.hf.compile_shapes") == 1, caplog.text
        # one compile for the rung, whatever the lengths (dynamic shapes; none if an engine of
        # this module compiled that rung before): a new length is a capture, not a compile
        assert counters["stats"]["unique_graphs"] <= 1
        assert compiled.stage_times()["compile"] > 0
    finally:
        compiled.close()
        eager.close()


def test_decode_attention_auto_is_grouped_only_with_the_compiled_decode(tiny_model, compiled):
    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    try:
        assert eager.modes()["decode_attention"] == "stock"  # grouped is slower eagerly
    finally:
        eager.close()
    assert compiled.modes()["decode_attention"] == "grouped"


def _owner_rule(eng) -> list[int]:
    """torch < 2.13's CUDA graph trees, mocked on ``model.generate``: a compiled call from a
    thread other than the first one's raises a bare AssertionError (pytorch/pytorch#123177;
    on the GPU only a new shape's recording asserts, here every compiled call). Returns the
    threads that called it."""
    import threading

    real, threads = eng.model.generate, []

    def generate(*args, **kwargs):
        threads.append(threading.get_ident())
        if not kwargs.get("disable_compile") and threads[-1] != threads[0]:
            raise AssertionError
        return real(*args, **kwargs)

    eng.model.generate = generate
    return threads


def test_every_model_call_runs_on_the_engines_one_thread(tiny_model):
    """The actor warms the engine up on its thread, the batching adapter runs batches on
    another: on the H100 (torch 2.11) every batch of a new shape failed, down to single rows
    (session 12). All model calls now run on the engine's own thread: under the mocked rule
    batches of new shapes from another thread compile and answer as the eager engine does."""
    import threading

    compiled = make_batch_engine(small_engine_config(tiny_model, compile=True, compile_after=1))
    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    threads = _owner_rule(compiled)
    try:
        compiled.warmup(4)  # this (the actor's) thread
        batches = [engine_requests(1, prompt="Hi"), engine_requests(2), engine_requests(3)]
        got: list = []
        worker = threading.Thread(target=lambda: got.extend(map(compiled.generate, batches)))
        worker.start()
        worker.join()
        assert len(got) == 3, "the batch thread raised"
        for requests, results in zip(batches, got):
            want = [(r.text, r.output_tokens) for r in eager.generate(requests)]
            assert [(r.text, r.output_tokens, r.error_code) for r in results] == [
                (*w, None) for w in want
            ]
        assert compiled.caches.shapes() == [(1, 128), (2, 128), (4, 128)]
        assert not compiled.caches.failed
        assert set(threads) == {compiled._thread.ident} != {threading.get_ident()}
    finally:
        compiled.close()
        eager.close()


def test_a_shape_whose_compile_fails_runs_eagerly_and_is_not_kept(tiny_model, caplog):
    """A failed compile used to leave its shape's cache behind, so every later batch of the
    shape ran the broken compiled decode and failed, down to single rows (session 12: 69 error
    rows). Now the shape is dropped, warned once, and its batches run eagerly with eager's
    answers, never compiled again."""
    compiled = make_batch_engine(small_engine_config(tiny_model, compile=True, compile_after=1))
    eager = make_batch_engine(small_engine_config(tiny_model, compile=False))
    real, calls = compiled.model.generate, []

    def generate(*args, **kwargs):
        compiling = "min_new_tokens" in kwargs  # _compile_shape's throwaway batch
        calls.append(
            "compile" if compiling else "eager" if kwargs.get("disable_compile") else "graph"
        )
        if compiling:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real(*args, **kwargs)

    compiled.model.generate = generate
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                requests = engine_requests(2)  # rung 2, 128 tokens
                want = [(r.text, r.output_tokens) for r in eager.generate(requests)]
                got = compiled.generate(requests)
                assert [(r.text, r.output_tokens, r.error_code) for r in got] == [
                    (*w, None) for w in want
                ]
        assert calls == ["compile", "eager", "eager"]
        assert compiled.caches.shapes() == [] and compiled.caches.failed == {(2, 128)}
        assert caplog.text.count("compiling the decode for 2 rows x 128 tokens failed") == 1
        assert "operation not permitted" in caplog.text
        assert compiled.stage_times()["compile"] > 0
    finally:
        compiled.close()
        eager.close()


def test_a_shape_compiles_when_met_again(tiny_model):
    """engine.hf.compile_after (default 2): a shape's first batch runs eagerly, its second
    compiles; the warm-up's shape compiles at once. On the H100 each shape's compile took
    ~36 s and the mixed photos job met four shapes once each (session 12); a square job's
    first batch paid the warm-up shape's compile when the warm-up counted once (session 13)."""
    cfg = small_engine_config(tiny_model, compile=True)
    assert cfg.engine.hf.compile_after == 2
    compiled = make_batch_engine(cfg)
    try:
        compiled.warmup(4)
        assert compiled.caches.shapes() == [(4, 128)]  # the warm-up's: compiled
        compile_s = compiled.stage_times()["compile"]
        assert compile_s > 0
        compiled.generate(engine_requests(3))  # (4, 128) again: no compile in the batch
        assert compiled.stage_times()["compile"] == compile_s
        compiled.generate(engine_requests(2, prompt="Hi"))  # (2, 128) new: eager
        assert compiled.caches.shapes() == [(4, 128)]
        compiled.generate(engine_requests(1, prompt="Hi"))  # (1, 128) new: eager
        assert compiled.caches.shapes() == [(4, 128)]
        assert compiled.last_stages()["batch"] == 1
        compiled.generate(engine_requests(1, prompt="Hi"))
        assert compiled.caches.shapes() == [(1, 128), (4, 128)]
        assert compiled.caches.eager_batches == 0  # none refused past a bound
    finally:
        compiled.close()


def test_at_most_two_compiles_whatever_the_rungs(tiny_model):
    """The first compile is specialised to its rung (the static cache's batch dimension); the
    second rung's recompile is dynamic and serves every later rung: two compiles a process (at
    ~100 s each for a 7B on an H100, what bounds a mixed-size job's compile seconds)."""
    import dataclasses

    from torch._dynamo.utils import counters

    cfg = small_engine_config(tiny_model, compile=True, compile_after=1)
    cfg = dataclasses.replace(cfg, batching=dataclasses.replace(cfg.batching, max_batch_size=16))
    compiled = make_batch_engine(cfg)
    torch._dynamo.reset()  # graphs of other engines in this process would serve these rungs
    counters.clear()
    try:
        graphs = []
        for rows in (16, 8, 3, 16):
            compiled.generate(engine_requests(rows))
            graphs.append(counters["stats"]["unique_graphs"])
        assert compiled.caches.shapes() == [(4, 128), (8, 128), (16, 128)]
        assert graphs == [1, 2, 2, 2]
    finally:
        compiled.close()
