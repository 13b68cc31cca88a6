"""The transformers engine on CPU with the tiny random Qwen2.5-VL: batched output must equal
row-by-row ``model.generate`` (float32, greedy), token counts must equal the tokenizer's, and
guided decoding (xgrammar) must turn the random model's noise into answers of the job's schema."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qvl_batch.config import Config, EngineConfig, SamplingConfig, StructuredConfig  # noqa: E402
from qvl_batch.engines.base import Request  # noqa: E402
from qvl_batch.engines.build import make_batch_engine  # noqa: E402
from qvl_batch.engines.hf import guided  # noqa: E402
from qvl_batch.engines.hf.engine import generation_kwargs  # noqa: E402
from qvl_batch.engines.hf.loading import load_processor, local_model_dir  # noqa: E402
from qvl_batch.errors import Exit  # noqa: E402
from qvl_batch.output.structured import OutputParser  # noqa: E402
from qvl_batch.run.validate import load_job  # noqa: E402

from ..conftest import MODERATION  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(180)

EOS = [151645, 151643]
MAX_TOKENS = 24


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _request(i: int, image: Image.Image, prompt: str, system: str | None = None) -> Request:
    width, height = image.size
    return Request(
        key=("unit", i),
        row_id=f"row-{i}",
        prompt=prompt,
        system=system,
        image=image,
        image_sha256="0" * 64,
        vision_tokens=(width // 28) * (height // 28),
        text_tokens=0,
    )


def _config(model: str, structured: StructuredConfig | None = None, **sampling) -> Config:
    return Config(
        engine=EngineConfig(name="hf", model=model, device="cpu"),
        sampling=SamplingConfig(**{"max_tokens": MAX_TOKENS, **sampling}),
        structured=structured or StructuredConfig(),
    )


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = make_batch_engine(_config(tiny_model))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def direct(tiny_model):
    """The model and processor as a user would load them, independent of the engine."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model, dtype=torch.float32
    )
    return model.eval(), load_processor(tiny_model)


def direct_generate(direct, image, prompt, system=None, max_tokens=MAX_TOKENS) -> dict:
    """One row alone through ``model.generate`` (greedy): what the engine must reproduce."""
    model, processor = direct
    messages = [] if system is None else [{"role": "system", "content": system}]
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt", do_resize=False)
    ids = inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=EOS,
            pad_token_id=151643,
        )
    new = out[0, len(ids) :].tolist()
    stop = next((i for i, t in enumerate(new) if t in EOS), None)
    n_out = len(new) if stop is None else stop + 1
    return {
        "text": processor.tokenizer.decode(new[:n_out], skip_special_tokens=True),
        "finish_reason": "length" if stop is None else "stop",
        "output_tokens": n_out,
        "prompt_tokens": len(ids),
        "vision_tokens": ids.count(151655),
    }


PROMPTS = [
    ("Describe this image.", None),
    ("What colours dominate this image? Answer in one short sentence, please.", None),
    ("How many shapes?", "You are a terse assistant."),
    ("List three things you notice in the picture, separated by commas.", None),
    ("Is this photo taken indoors or outdoors?", ""),
    ("Écris une légende courte. 写一个标题。", "Be brief."),
]


def test_engine_identity(engine):
    assert engine.name == "hf"
    assert engine.version == transformers.__version__
    assert engine.device.type == "cpu" and engine.dtype == torch.float32  # dtype auto on CPU
    assert engine.max_positions == 8192 and engine.image_token_id == 151655


def test_batch_equals_row_by_row_generation(engine, direct):
    sizes = [(112, 84), (84, 140)]  # two resized sizes: 12 and 15 vision tokens
    requests = [
        _request(i, _image(*sizes[i % 2], seed=i), prompt, system)
        for i, (prompt, system) in enumerate(PROMPTS)
    ]
    results = engine.generate(list(reversed(requests)))  # any order; keys are echoed
    by_key = {r.key: r for r in results}
    assert sorted(by_key) == sorted(r.key for r in requests)
    for req in requests:
        got = by_key[req.key]
        want = direct_generate(direct, req.image, req.prompt, req.system)
        assert got.error_code is None, got.error_message
        assert got.vision_tokens == req.vision_tokens == want["vision_tokens"]
        assert got.prompt_tokens == want["prompt_tokens"]
        text_tokens = engine.count_text_tokens(req.prompt, req.system)
        assert got.prompt_tokens == text_tokens + req.vision_tokens
        assert (got.text, got.finish_reason, got.output_tokens) == (
            want["text"],
            want["finish_reason"],
            want["output_tokens"],
        ), req.key
        assert got.output_tokens <= MAX_TOKENS
    assert len({r.text for r in results}) == len(results), "outputs depend on image and prompt"
    # The tiny model is shaped to stop sometimes (modelgen._shape_vocab): both paths run here.
    assert {r.finish_reason for r in results} == {"stop", "length"}


def test_inputs_prepared_ahead_give_the_same_answers_and_their_own_clock(engine):
    """The batching adapter's path: ``prepare`` (host inputs) on one call, ``generate`` later;
    the seconds go to the ``ahead`` clock, not to ``inputs`` on the model's path."""
    image, other = _image(112, 84, seed=1), _image(84, 140, seed=2)
    requests = [
        _request(i, img, prompt)
        for i, (img, (prompt, _)) in enumerate(zip([image, other, other], PROMPTS))
    ]
    inline = {r.key: (r.text, r.output_tokens) for r in engine.generate(requests)}
    engine.reset_stage_times()
    prepared = engine.prepare(requests)
    assert prepared.requests == requests and prepared.refused == [] and prepared.seconds > 0
    ahead = {r.key: (r.text, r.output_tokens) for r in engine.generate(requests, prepared)}
    assert ahead == inline
    stages = engine.stage_times()
    assert stages["ahead"] == pytest.approx(prepared.seconds)
    assert 0 < stages["inputs"] < stages["generate"]  # the device side only, timed apart


def test_job_sampling_replaces_the_checkpoint_defaults(engine, tiny_model):
    import json
    from pathlib import Path

    shipped = json.loads(Path(tiny_model, "generation_config.json").read_text())
    assert shipped["do_sample"] is True and shipped["repetition_penalty"] == 1.05
    gen = engine.model.generation_config
    assert gen.do_sample is False and gen.repetition_penalty == 1.0
    assert list(gen.eos_token_id) == EOS and gen.pad_token_id == 151643

    assert generation_kwargs(SamplingConfig(temperature=0)) == {
        "repetition_penalty": 1.0,
        "num_beams": 1,
        "do_sample": False,
    }
    sampled = SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1)
    assert generation_kwargs(sampled) == {
        "repetition_penalty": 1.1,
        "num_beams": 1,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": None,
    }
    assert generation_kwargs(SamplingConfig(temperature=1.0, top_k=5))["top_k"] == 5


def test_count_text_tokens_is_the_templated_prompt_without_image_pads(engine):
    tok = engine.tokenizer
    cases = [("", None), ("Hi", None), ("a\n\nb  c", "sys"), ("<|im_end|> x", None)]
    cases += [(p, s) for p, s in PROMPTS]
    for prompt, system in cases:
        full = tok(engine.render(prompt, system), add_special_tokens=False)["input_ids"]
        assert full.count(151655) == 1
        assert engine.count_text_tokens(prompt, system) == len(full) - 1, (prompt, system)
    assert engine.tokens.split_ok  # the cached-overhead path is the one measured


def test_prompt_over_the_model_limit_is_a_row_error(engine, direct, monkeypatch):
    image = _image(56, 56, seed=7)
    short = _request(0, image, "Describe this image.")
    base = engine.count_text_tokens(short.prompt, None) + short.vision_tokens
    monkeypatch.setattr(engine, "max_positions", base + 3)  # room for 3 new tokens
    long = _request(1, image, "Describe this image. " * 20)
    assert [r.key for r in engine.prepare([short, long]).refused] == [long.key]
    results = {r.key: r for r in engine.generate([short, long])}
    assert results[long.key].error_code == "ENGINE_ERROR"
    assert "tokens" in results[long.key].error_message
    got = results[short.key]
    assert got.error_code is None and got.output_tokens <= 3
    want = direct_generate(direct, image, short.prompt, max_tokens=3)
    assert (got.text, got.output_tokens, got.finish_reason) == (
        want["text"],
        want["output_tokens"],
        want["finish_reason"],
    )


def test_sampling_is_seeded_per_batch(tiny_model):
    eng = make_batch_engine(_config(tiny_model, temperature=1.0, top_p=0.95, seed=1))
    try:
        requests = [_request(i, _image(56, 84, seed=i), PROMPTS[i][0]) for i in range(3)]
        first = [r.text for r in eng.generate(requests)]
        assert [r.text for r in eng.generate(requests)] == first
        eng.sampling.seed = 2
        assert [r.text for r in eng.generate(requests)] != first
    finally:
        eng.close()
    assert eng.model is None
    eng.close()  # twice is fine


def test_model_from_an_fsspec_url_is_copied_once(tiny_model, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("QVL_BATCH_MODEL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.put(tiny_model.rstrip("/") + "/", "/models/tiny/", recursive=True)
    try:
        local = local_model_dir("memory://models/tiny")
        names = sorted(p.name for p in (tmp_path / "cache").glob("*/*") if p.name[0] != ".")
        assert names == sorted(p.name for p in __import__("pathlib").Path(tiny_model).iterdir())
        assert local_model_dir("memory://models/tiny") == local  # cached
        assert local_model_dir(tiny_model) == tiny_model  # local paths are used in place
        processor = load_processor(local)
        assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    finally:
        fs.rm("/models", recursive=True)


# ---------------------------------------------------------------------------- guided decoding

# xgrammar (0.2.8, 0.1.21) does not enforce uniqueItems: a guided answer may repeat a category,
# which the parser reports (an OUTPUT_PARSE_ERROR row in a job). Every other keyword holds.
_CATEGORIES = MODERATION["properties"]["categories"]
ENFORCED = {
    **MODERATION,
    "properties": {
        **MODERATION["properties"],
        "categories": {k: v for k, v in _CATEGORIES.items() if k != "uniqueItems"},
    },
}
# A random model would happily write digits forever, but the grammar bounds the answer: xgrammar
# writes a number in [0, 1] with at most 6 decimals, so the longest answer is 92 characters
# ({"verdict": "review", "categories": ["violence", "violence", "violence"], "score": 0.000001})
# and, a byte-level token being at least one character, 96 tokens always leave room for the EOS.
GUIDED_MAX_TOKENS = 96


def _structured(guided: str) -> StructuredConfig:
    return StructuredConfig(json_schema=MODERATION, guided=guided)


def _moderation_requests() -> list[Request]:
    """Six rows of different prompt lengths (so the batch is left-padded)."""
    sizes = [(56, 84), (84, 56), (112, 84)]
    return [
        _request(i, _image(*sizes[i % 3], seed=100 + i), prompt, system)
        for i, (prompt, system) in enumerate(PROMPTS)
    ]


def _generate(model: str, guided: str, **sampling) -> tuple[bool, list]:
    """(engine.guided, results in request order) for the moderation rows."""
    eng = make_batch_engine(
        _config(model, _structured(guided), **{"max_tokens": GUIDED_MAX_TOKENS, **sampling})
    )
    try:
        requests = _moderation_requests()
        by_key = {r.key: r for r in eng.generate(requests)}
        return eng.guided, [by_key[req.key] for req in requests]
    finally:
        eng.close()


def _assert_schema_answers(results) -> None:
    """Every row stopped on its own and parses into typed values of the schema."""
    strict, enforced = OutputParser(MODERATION), OutputParser(ENFORCED)
    for got in results:
        assert got.error_code is None, got.error_message
        assert got.finish_reason == "stop", (got.key, got.text)
        values, error = enforced.parse(got.text, got.finish_reason)
        assert error is None, (got.key, error)
        assert list(values) == ["verdict", "categories", "score"]
        assert values["verdict"] in ("allow", "review", "block")
        assert len(values["categories"]) <= 3
        assert set(values["categories"]) <= {"violence", "sexual", "hate", "spam"}
        assert type(values["score"]) is float and 0.0 <= values["score"] <= 1.0
        _, error = strict.parse(got.text, got.finish_reason)
        assert error is None or "non-unique" in error, error  # the one keyword left to the parser


def test_guided_answers_parse_into_typed_columns(tiny_model):
    guided, results = _generate(tiny_model, "required")
    assert guided is True
    assert len({r.prompt_tokens for r in results}) > 1, "left padding in the batch"
    _assert_schema_answers(results)
    assert len({r.output_tokens for r in results}) > 1, "rows finished at different steps"
    assert all(r.output_tokens < GUIDED_MAX_TOKENS for r in results)


def test_without_the_constraint_the_random_model_writes_no_json(tiny_model):
    """Same rows, guided=off: the random weights write noise, so the constraint did the work."""
    guided, results = _generate(tiny_model, "off")
    assert guided is False
    parser = OutputParser(ENFORCED)
    parsed = [parser.parse(r.text, r.finish_reason)[1] is None for r in results]
    assert not any(parsed), [r.text for r in results]


def test_guided_sampling_masks_before_top_k_and_top_p(tiny_model):
    """The grammar mask runs before the sampling warpers: after them it could leave a row
    nothing to sample (all -inf) or a token outside the grammar."""
    guided, results = _generate(tiny_model, "auto", temperature=1.0, top_p=0.8, top_k=5, seed=3)
    assert guided is True
    _assert_schema_answers(results)


def test_required_without_xgrammar_refuses_before_loading_the_model(tiny_model, monkeypatch):
    # Stand-in for an install without xgrammar: a None entry makes `import xgrammar` fail.
    monkeypatch.setitem(sys.modules, "xgrammar", None)

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model loaded before the xgrammar check")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_model_load)
    with pytest.raises(ImportError, match=r"guided=required.*pip install xgrammar"):
        make_batch_engine(_config(tiny_model, _structured("required")))


def test_auto_without_xgrammar_warns_once_and_generates_freely(tiny_model, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # stand-in, as above
    guided._warn_unguided.cache_clear()
    request = _request(0, _image(56, 56, seed=1), "Moderate this image.")
    with caplog.at_level(logging.WARNING, logger=guided.__name__):
        for _ in range(2):  # a replacement actor's engine does not warn again
            eng = make_batch_engine(_config(tiny_model, _structured("auto")))
            try:
                assert eng.guided is False and eng.guide is None
                (got,) = eng.generate([request])
            finally:
                eng.close()
            assert got.error_code is None and got.text is not None
    warnings = [r for r in caplog.records if "pip install xgrammar" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "guided=auto" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------- e2e


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["lockstep", "inflight"])
def test_job_with_hf_engine_end_to_end(tmp_path, tiny_model, direct, ray_head, schedule):
    """A job through actors: every row's answer is the model's own, lock-step or in flight
    (``engine.hf.schedule``; 3 slots: rows enter as others leave)."""
    from qvl_batch.rows.images import prepare_image
    from qvl_batch.run.driver import run_job
    from qvl_batch.tooling.synth import SynthSpec, make_dataset

    from ..conftest import input_rows, read_output, write_job

    data = tmp_path / "data"
    spec = SynthSpec(rows=24, shards=2, row_group_rows=6, max_side=200, corrupt_fraction=0.0)
    make_dataset(str(data), spec)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", data, out, ray_head)
    overrides = ["engine.name=hf", f"engine.model={tiny_model}", "sampling.max_tokens=12"]
    overrides += [f"engine.hf.schedule={schedule}", "engine.hf.slots=3"]
    cfg = load_job(job, overrides)
    summary = run_job(cfg, progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()

    rows, errors = read_output(out)
    inputs = {r["id"]: r for r in input_rows(data)}
    assert not errors
    assert sorted(r["id"] for r in rows) == sorted(inputs), "every id exactly once"
    assert all(r["engine"] == "hf" for r in rows)
    metrics = json.loads((out / "_metrics.json").read_text())
    modes = [actor["engine_modes"] for actor in metrics["actors"]]
    assert modes and {m.get("schedule", "lockstep") for m in modes} == {schedule}
    if schedule == "inflight":  # its occupancy clocks reach the job's metrics
        assert metrics["actor_timings_s"]["engine_slot_s"] > 0
    for row in rows:
        prepared = prepare_image(inputs[row["id"]]["image"], cfg.image)
        assert (row["resized_width"], row["resized_height"]) == prepared.image.size
        want = direct_generate(direct, prepared.image, cfg.prompt.template, max_tokens=12)
        assert row["vision_tokens"] == prepared.vision_tokens == want["vision_tokens"]
        assert row["prompt_tokens"] == want["prompt_tokens"]
        assert (row["text"], row["finish_reason"], row["output_tokens"]) == (
            want["text"],
            want["finish_reason"],
            want["output_tokens"],
        ), row["id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_moderation_preset_with_the_tiny_model(tmp_path, tiny_model, ray_head):
    """The moderation preset on the tiny random model: guided answers land in typed columns;
    unguided, the random model writes no JSON and every row is an OUTPUT_PARSE_ERROR."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from qvl_batch.commands.verify import verify_output
    from qvl_batch.run.driver import run_job
    from qvl_batch.tooling.synth import SynthSpec, make_dataset

    from ..conftest import REPO, read_output

    data = tmp_path / "data"
    spec = SynthSpec(rows=12, shards=1, row_group_rows=6, max_side=160, corrupt_fraction=0.0)
    make_dataset(str(data), spec)

    def run(out, *extra):
        overrides = [
            f"input.paths=[{data}/*.parquet]",
            f"output.path={out}",
            "engine.name=hf",
            f"engine.model={tiny_model}",
            f"cluster.address={ray_head}",
            "cluster.num_actors=1",
            "batching.max_batch_size=6",
            # room for the longest answer the grammar allows (a 200-character reason)
            "sampling.max_tokens=320",
            "limits.max_error_fraction=1.0",
            *extra,
        ]
        cfg = load_job(REPO / "jobs" / "moderation.yaml", overrides)
        summary = run_job(cfg, progress_bar=False)
        assert summary.exit_code == Exit.OK, summary.lines()
        assert verify_output(str(out)).ok
        return read_output(out)

    rows, errors = run(tmp_path / "guided")
    assert not errors and len(rows) == 12
    schema = ds.dataset(str(tmp_path / "guided" / "data")).schema
    assert schema.field("categories").type == pa.list_(pa.string())
    assert schema.field("score").type == pa.float64()
    for row in rows:
        answer = json.loads(row["text"], strict=False)  # raw control characters in strings
        assert row["verdict"] == answer["verdict"] in ("allow", "review", "block")
        assert row["categories"] == answer["categories"] and 0 <= row["score"] <= 1
        assert row["finish_reason"] == "stop"

    rows, errors = run(tmp_path / "free", "structured.guided=off", "sampling.max_tokens=24")
    assert not rows and len(errors) == 12
    assert {e["error_code"] for e in errors} == {"OUTPUT_PARSE_ERROR"}


def test_warmup_runs_one_throwaway_batch(engine, monkeypatch):
    seen = []
    real = engine._generate
    monkeypatch.setattr(
        engine, "_generate", lambda batch, *rest: seen.append(batch) or real(batch, *rest)
    )
    engine.warmup(3)
    assert [len(b) for b in seen] == [3]
    assert {r.image.size for r in seen[0]} == {(448, 448)} and seen[0][0].vision_tokens == 256
