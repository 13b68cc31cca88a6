"""The TensorRT-LLM engine against the API contract in tests/data/trtllm_api_surface.json.

TensorRT-LLM cannot be installed here, so most tests run the engine against the stand-in in
``tests/trtllm_stub`` (built from that JSON: unknown keyword names raise, as in the real API).
A static check compares every name the engine passes with the JSON directly. Tests marked
``trtllm`` run the real package where it imports (NVIDIA's TensorRT-LLM container) with a model
from ``QVL_TRTLLM_MODEL``, and are skipped elsewhere.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from qvl_batch.config import (
    Config,
    EngineConfig,
    ImageConfig,
    SamplingConfig,
    StructuredConfig,
)
from qvl_batch.engines.base import EngineDead, EngineError, Request, Result
from qvl_batch.engines.build import make_engine
from qvl_batch.engines.trtllm import api as trtllm_api
from qvl_batch.engines.trtllm import engine as trtllm_engine
from qvl_batch.engines.trtllm import outputs, prompts
from qvl_batch.engines.trtllm.settings import TrtLlmEngineConfig
from qvl_batch.output.structured import OutputParser

from ..conftest import MODERATION, input_rows, read_output, write_job
from .conftest import STUB_DIR, _purge_trtllm_modules

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SURFACE = json.loads((TESTS / "data" / "trtllm_api_surface.json").read_text())
ENGINE_SOURCES = sorted(Path(trtllm_engine.__file__).parent.glob("*.py"))


def make_cfg(
    model_dir: Path | str,
    sampling: dict | None = None,
    options: dict | None = None,
    structured: dict | None = None,
    image: dict | None = None,
    **trt,
):
    """A trtllm Config without job files (output/input are not needed by the engine)."""
    engine = EngineConfig(
        name="trtllm",
        model=str(model_dir),
        options=dict(options or {}),
        trtllm=TrtLlmEngineConfig(**trt),
    )
    return Config(
        engine=engine,
        sampling=SamplingConfig(**(sampling or {})),
        structured=StructuredConfig(**(structured or {})),
        image=ImageConfig(**(image or {})),
    )


SIZES = [(56, 84), (112, 28), (280, 280), (56, 56), (84, 56)]  # within the processor's bounds


def make_requests(n: int = 5, prompt: str = "Describe this image.", system: str | None = None):
    requests = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = Image.new("RGB", (w, h), ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256))
        sha = hashlib.sha256(img.tobytes()).hexdigest()
        vision = (w // 28) * (h // 28)
        requests.append(Request(("u0", i), f"r{i}", prompt, system, img, sha, vision, 0))
    return requests


class Sink:
    """The actor's side of the stream seam, for engine tests: collects what the engine says."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.entered: list[list] = []
        self.failed: BaseException | None = None
        self._cond = threading.Condition()

    def entering(self, keys) -> None:
        self.entered.append(list(keys))

    def put(self, result: Result) -> None:
        with self._cond:
            self.results.append(result)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.failed = exc
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 30.0) -> list[Result]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.results) >= n or self.failed, timeout)
        assert ok, f"{len(self.results)} of {n} results after {timeout}s"
        return list(self.results)

    def wait_failed(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.failed is not None, timeout)


def run(engine, requests: list[Request], timeout: float = 30.0) -> list[Result]:
    """Submit ``requests`` as the actor does (starting the engine once) and wait for them."""
    sink = getattr(engine, "_test_sink", None)
    if sink is None:
        sink = engine._test_sink = Sink()
        engine.start(sink)
    before = len(sink.results)
    engine.submit(requests)
    results = sink.wait(before + len(requests), timeout)[before:]
    assert sink.failed is None, sink.failed
    return results


def stub_env(monkeypatch, **behaviour) -> None:
    """The stand-in's behaviour (``TRTLLM_STUB``) for engines built in this process."""
    monkeypatch.setenv("TRTLLM_STUB", json.dumps(behaviour))


def pixels_sha(request: Request) -> str:
    return hashlib.sha256(request.image.tobytes()).hexdigest()


# --- the engine against the stand-in ------------------------------------------------------------


def test_engine_builds_generates_and_maps_outputs(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    assert (engine.name, engine.version) == ("trtllm", "0.0.0+stub")
    requests = make_requests()
    results = run(engine, requests)
    assert sorted(r.key for r in results) == sorted(r.key for r in requests)
    by_key = {r.key: r for r in results}
    for req in requests:
        res = by_key[req.key]
        assert res.error_code is None, res.error_message
        assert res.text and res.finish_reason in ("stop", "length")
        assert res.output_tokens == len(res.text.split())
        assert res.vision_tokens == req.vision_tokens  # counted from prompt_token_ids
        expected_ids = engine.llm.tokenizer.encode(engine.inputs(req)["prompt"], [req.image])
        assert res.prompt_tokens == len(expected_ids) > res.vision_tokens
    again = {r.key: r for r in run(engine, requests)}
    assert again == by_key, "same requests, same outputs"
    engine.close()


def test_vision_tokens_come_from_prompt_ids_not_the_runner(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    (req,) = make_requests(1)
    req.vision_tokens = 999  # a wrong estimate must not leak into the result
    (res,) = run(engine, [req])
    assert res.vision_tokens == (56 // 28) * (84 // 28)
    engine.close()


def test_llm_kwargs_reach_the_llm(stub, model_dir):
    cfg = make_cfg(model_dir, tensor_parallel_size=2, max_batch_size=16, max_seq_len=4096)
    engine = trtllm_engine.TrtLlmEngine(cfg)
    passed = engine.llm.passed_kwargs
    assert passed["model"] == str(model_dir)
    assert passed["backend"] == "pytorch"
    assert passed["trust_remote_code"] is False
    assert (passed["tensor_parallel_size"], passed["max_batch_size"]) == (2, 16)
    assert (passed["max_seq_len"], passed["max_num_tokens"], passed["dtype"]) == (
        4096,
        16384,
        "auto",
    )
    assert passed["kv_cache_config"].free_gpu_memory_fraction == 0.85
    assert passed["cuda_graph_config"].passed_kwargs == {
        "max_batch_size": 16,
        "enable_padding": True,
    }
    engine.close()


def test_max_tokens_is_always_explicit_and_honoured(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    assert engine._sampling.passed_kwargs["max_tokens"] == 64  # the job default, not TRT's 32
    engine.close()
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, sampling={"max_tokens": 2}))
    results = run(engine, make_requests())
    assert all(r.output_tokens <= 2 for r in results)
    assert {r.finish_reason for r in results} == {"length"}
    engine.close()


def test_block_reuse_off_by_default_and_on_when_configured(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    kv = engine.llm.passed_kwargs["kv_cache_config"]
    assert kv.passed_kwargs["enable_block_reuse"] is False  # explicit: TRT's default is True
    engine.close()
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, enable_block_reuse=True))
    assert engine.llm.passed_kwargs["kv_cache_config"].enable_block_reuse is True
    engine.close()


def test_cuda_graphs_off_passes_none(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, cuda_graphs=False))
    assert "cuda_graph_config" in engine.llm.passed_kwargs
    assert engine.llm.passed_kwargs["cuda_graph_config"] is None  # None disables; absent = on
    engine.close()


def test_passthrough_options_arrive_and_override(stub, model_dir):
    options = {"enable_chunked_prefill": True, "max_input_len": 4096, "dtype": "bfloat16"}
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, options=options))
    for key, value in options.items():
        assert engine.llm.passed_kwargs[key] == value
    engine.close()


def test_an_option_the_real_api_lacks_fails(stub, model_dir):
    with pytest.raises((TypeError, ValueError), match="not_a_real_arg"):
        trtllm_engine.TrtLlmEngine(make_cfg(model_dir, options={"not_a_real_arg": 1}))


def test_contract_catches_an_engine_passing_an_unknown_name(stub, model_dir, monkeypatch):
    """Proves the contract test can fail: a plausible mistake in the kwargs builder is caught."""
    real = trtllm_api.llm_kwargs

    def with_misplaced_field(cfg, api):
        return {**real(cfg, api), "free_gpu_memory_fraction": 0.5}  # belongs in KvCacheConfig

    monkeypatch.setattr(trtllm_engine, "llm_kwargs", with_misplaced_field)
    with pytest.raises((TypeError, ValueError), match="free_gpu_memory_fraction"):
        trtllm_engine.TrtLlmEngine(make_cfg(model_dir))

    monkeypatch.setattr(trtllm_engine, "llm_kwargs", real)
    real_sampling = trtllm_api.sampling_kwargs

    def with_unknown_field(cfg, *a):
        return {**real_sampling(cfg, *a), "max_new_tokens": 8}

    monkeypatch.setattr(trtllm_engine, "sampling_kwargs", with_unknown_field)
    with pytest.raises((TypeError, ValueError), match="max_new_tokens"):
        trtllm_engine.TrtLlmEngine(make_cfg(model_dir))


def test_guided_decoding_reaches_the_llm_and_every_request(stub, model_dir, monkeypatch):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, structured={"json_schema": MODERATION}))
    try:
        assert engine.guided is True  # guided=auto: TensorRT-LLM always has it
        assert engine.llm.passed_kwargs["guided_decoding_backend"] == "xgrammar"
        seen = []
        submit = engine.llm.generate_async

        def spy(inputs, sampling_params=None):
            seen.append(sampling_params)
            return submit(inputs, sampling_params=sampling_params)

        monkeypatch.setattr(engine.llm, "generate_async", spy)
        results = run(engine, make_requests(3))
        assert [r.error_code for r in results] == [None] * 3
        assert len(seen) == 3
        for sampling in seen:
            guide = sampling.guided_decoding
            assert isinstance(guide, stub.llmapi.GuidedDecodingParams)
            assert set(guide.passed_kwargs) == {"json"}  # the one guide; no other set
            assert isinstance(guide.json, str) and json.loads(guide.json) == MODERATION
    finally:
        engine.close()


@pytest.mark.parametrize("structured", [{}, {"json_schema": MODERATION, "guided": "off"}])
def test_no_guided_decoding_without_a_schema_or_when_off(stub, model_dir, structured):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, structured=structured))
    assert engine.guided is False
    assert "guided_decoding_backend" not in engine.llm.passed_kwargs
    assert "guided_decoding" not in engine._sampling.passed_kwargs
    engine.close()


def test_guided_decoding_backend_can_be_chosen_in_options(stub, model_dir):
    options = {"guided_decoding_backend": "llguidance"}
    structured = {"json_schema": MODERATION, "guided": "required"}
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, options=options, structured=structured))
    assert engine.guided is True
    assert engine.llm.passed_kwargs["guided_decoding_backend"] == "llguidance"
    engine.close()


def test_contract_catches_guided_decoding_misuse(stub, model_dir, monkeypatch):
    """Proves the guided checks can fail: a guide without the LLM's backend, a wrong field."""
    real = trtllm_api.llm_kwargs

    def without_backend(cfg, api):
        return {k: v for k, v in real(cfg, api).items() if k != "guided_decoding_backend"}

    monkeypatch.setattr(trtllm_engine, "llm_kwargs", without_backend)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, structured={"json_schema": MODERATION}))
    results = run(engine, make_requests(2))
    engine.close()
    assert {r.error_code for r in results} == {"ENGINE_ERROR"}
    assert all("guided_decoding_backend" in r.error_message for r in results)
    guide = stub.llmapi.GuidedDecodingParams
    with pytest.raises((TypeError, ValueError), match="json_schema"):
        guide(json_schema=MODERATION)  # vLLM-style name; TensorRT-LLM's field is `json`
    with pytest.raises((TypeError, ValueError), match="one guide"):
        stub.SamplingParams(guided_decoding=guide(json="{}", regex="x"))


def test_stub_rejects_bad_prompt_inputs(stub, model_dir):
    llm = stub.LLM(model=str(model_dir))
    img = Image.new("RGB", (28, 28))
    with pytest.raises((TypeError, ValueError), match="images"):
        llm.generate_async({"prompt": "x", "multi_modal_data": {"image": [img]}, "images": [img]})
    with pytest.raises((TypeError, ValueError), match="placeholder"):
        llm.generate_async({"prompt": "no pad", "multi_modal_data": {"image": [img]}})
    with pytest.raises((TypeError, ValueError), match="sampling"):
        llm.generate_async({"prompt": "x"}, sampling={"max_tokens": 3})


def test_a_failing_row_fails_alone(stub, model_dir, monkeypatch):
    requests = make_requests(4)
    stub_env(monkeypatch, fail=[pixels_sha(requests[2])])  # upstream's RequestError
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    real_submit = engine.llm.generate_async

    def refusing(inputs, **kwargs):
        if inputs["multi_modal_data"]["image"][0] is requests[1].image:
            raise ValueError("prompt too long")  # generate_async itself refuses
        return real_submit(inputs, **kwargs)

    engine.llm.generate_async = refusing
    by_key = {r.key: r for r in run(engine, requests)}
    assert by_key[requests[1].key].error_code == "ENGINE_ERROR"
    assert "prompt too long" in by_key[requests[1].key].error_message
    assert by_key[requests[2].key].error_code == "ENGINE_ERROR"
    assert "RequestError" in by_key[requests[2].key].error_message
    assert by_key[requests[0].key].error_code is None and by_key[requests[3].key].text
    assert engine._test_sink.failed is None  # per-request failures leave the engine alive
    engine.close()


def test_two_threads_inside_generate_async_fail_the_stand_in(stub, model_dir, monkeypatch):
    """Upstream's submit path is not thread-safe; the stand-in refuses what would corrupt it,
    so the engine's single submitting thread is what keeps the other tests green."""
    stub_env(monkeypatch, submit_cpu_s=0.005)
    llm = stub.LLM(model=str(model_dir))
    requests = make_requests(10)
    errors: list[BaseException] = []

    def hammer() -> None:
        for req in requests:
            try:
                inputs = {
                    "prompt": f"<|image_pad|> {req.prompt}",
                    "multi_modal_data": {"image": [req.image]},
                }
                llm.generate_async(inputs)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors and llm.violations == len(errors)
    assert all("two threads" in str(e) for e in errors)
    llm.shutdown()


def test_one_thread_submits_and_results_come_back_as_each_finishes(stub, model_dir, monkeypatch):
    stub_env(monkeypatch, step_s=0.002)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_batch_size=4))
    assert engine.max_in_flight == 8  # twice the engine's batch by default
    requests = make_requests(24, prompt="Describe")
    results = run(engine, requests)
    llm = engine.llm
    assert (llm.submit_threads and len(llm.submit_threads), llm.violations) == (1, 0)
    assert threading.get_ident() not in llm.submit_threads  # the engine's own submit thread
    assert llm.peak_in_flight > 4 and llm.peak_running == 4  # requests waited in its scheduler
    order = [r.key for r in results]
    assert order != [r.key for r in requests], "finished in submission order: not in flight"
    assert sorted(order) == sorted(r.key for r in requests)
    assert engine._test_sink.entered == [[r.key for r in requests]]  # one note per group
    engine.close()
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_inflight_requests=3))
    assert engine.max_in_flight == 3
    engine.close()


def test_a_request_that_never_completes_is_aborted_retried_then_a_timeout_row(
    stub, model_dir, monkeypatch
):
    """While other requests answer, the executor lives: the silent one is aborted (it is
    running, so 1.2 answers the abort), tried once more, then an ENGINE_TIMEOUT row."""
    import dataclasses

    hung, *_ = make_requests(1)
    stub_env(monkeypatch, hang=[pixels_sha(hung)], step_s=0.02)  # others answer in < 0.35 s
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, request_timeout_s=0.5))
    sink = Sink()
    engine.start(sink)
    engine.submit([hung])
    others = []
    for wave in range(20):  # answers keep coming for 2 s, past both of the hung row's tries
        batch = [
            dataclasses.replace(r, key=("w", wave, i)) for i, r in enumerate(make_requests(5)[1:])
        ]
        engine.submit(batch)
        others += batch
        time.sleep(0.1)
    by_key = {r.key: r for r in sink.wait(1 + len(others), timeout=30)}
    assert sink.failed is None, sink.failed
    assert by_key[hung.key].error_code == "ENGINE_TIMEOUT"
    assert "2 tries" in by_key[hung.key].error_message
    assert [by_key[r.key] for r in others if by_key[r.key].error_code] == []
    engine.close()


def test_a_lone_silent_request_is_not_aborted_into_a_possibly_dead_worker(
    stub, model_dir, monkeypatch
):
    """Nothing answers at all: aborting would be a blocking send into a worker that may be dead
    (1.2), and retrying would cost the timeout again; the request keeps waiting, and the actor's
    watchdog (limits.stall_s) decides whether the engine stalled."""
    requests = make_requests(1)
    stub_env(monkeypatch, hang=[pixels_sha(requests[0])])
    aborts = []
    monkeypatch.setattr(trtllm_engine.TrtLlmEngine, "_abort", lambda self, h: aborts.append(h))
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, request_timeout_s=0.3))
    sink = Sink()
    engine.start(sink)
    engine.submit(requests)
    time.sleep(1.5)  # five timeouts
    assert (aborts, sink.results, sink.failed) == ([], [], None)
    engine.close()


def test_a_dead_executor_fails_the_engine_not_the_rows(stub, model_dir, monkeypatch):
    stub_env(monkeypatch, die_after=3, step_s=0.05)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    sink = engine._test_sink = Sink()
    engine.start(sink)
    engine.submit(make_requests(6))
    deadline = time.monotonic() + 10
    while sink.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(sink.failed, EngineDead), sink.failed
    assert engine.llm._dead is not None  # the stand-in's executor did die
    # No row is condemned for the executor's death: the actor is replaced and they run again.
    assert not [r for r in sink.results if r.error_code]
    engine.close()


def test_finish_reasons_timeout_and_cancelled_are_error_rows():
    (req,) = make_requests(1)

    def output(reason: str):
        completion = SimpleNamespace(text="x", token_ids=[1], finish_reason=reason)
        return SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2])

    assert outputs.to_result(req, output("timeout"), 0, None).error_code == "ENGINE_TIMEOUT"
    assert outputs.to_result(req, output("cancelled"), 0, None).error_code == "ENGINE_ERROR"
    ok = outputs.to_result(req, output("stop"), 0, None)
    assert (ok.error_code, ok.text, ok.finish_reason) == (None, "x", "stop")


def test_pixel_bounds_outside_the_processors_are_refused_before_any_work(stub, model_dir):
    """TensorRT-LLM 1.2 counts an image's tokens with the processor's own bounds (its hash
    path): a job whose image.min_pixels lies below them would fail row by row, so it is refused
    with the job; inside them, the processor's resize of the runner's images is a no-op."""
    from qvl_batch.errors import ConfigError
    from qvl_batch.run.validate import validate

    (model_dir / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 12845056})
    )
    with pytest.raises(ConfigError, match=r"image\.min_pixels=784.*\[3136, 12845056\]"):
        validate(make_cfg(model_dir, image={"min_pixels": 784}))
    with pytest.raises(ConfigError, match=r"image\.max_pixels"):
        trtllm_engine.TrtLlmEngine(make_cfg(model_dir, image={"max_pixels": 12845056 * 2}))
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    assert "mm_processor_kwargs" not in engine.inputs(make_requests(1)[0])
    img = Image.new("RGB", (56, 84), (200, 10, 10))  # 6 tokens, as the runner sized it
    (res,) = run(engine, [Request(("u0", 0), "r0", "Describe", None, img, "", 6, 0)])
    assert res.vision_tokens == 6
    engine.close()


def test_stop_ids_are_every_eos_of_the_generation_config(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    tok = engine._tokenizer
    want = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert engine._sampling.passed_kwargs["stop_token_ids"] == want
    engine.close()
    no_files = SimpleNamespace(convert_tokens_to_ids=tok.convert_tokens_to_ids, unk_token_id=0)
    assert prompts.eos_token_ids("/nonexistent", no_files) == want  # Qwen's two, by name


def test_repetition_penalty_is_applied_or_never_silently_ignored(stub, model_dir, monkeypatch):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, sampling={"repetition_penalty": 1.1}))
    assert engine.llm.passed_kwargs["sampler_type"] == "TRTLLMSampler"  # 1.2's TorchSampler
    assert engine._sampling.repetition_penalty == 1.1  # ignores penalties (issue #9442)
    engine.close()
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    assert "sampler_type" not in engine.llm.passed_kwargs  # the default path when neutral
    engine.close()
    # Where the option is gone (PR #18232), the TorchSampler applies penalties (PR #16485):
    # told by the field, so a 1.3 release candidate that still has it keeps the TRTLLMSampler.
    from tensorrt_llm.llmapi import llm_args

    fields = dict(llm_args.TorchLlmArgs.model_fields)
    monkeypatch.setattr(stub, "__version__", "1.3.0rc1")
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, sampling={"repetition_penalty": 1.1}))
    assert engine.llm.passed_kwargs["sampler_type"] == "TRTLLMSampler"
    engine.close()
    del fields["sampler_type"]
    monkeypatch.setattr(llm_args.TorchLlmArgs, "model_fields", fields)
    params = {k: v for k, v in stub.LLM.PARAMS.items() if k != "sampler_type"}
    monkeypatch.setattr(stub.LLM, "PARAMS", params)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, sampling={"repetition_penalty": 1.1}))
    assert "sampler_type" not in engine.llm.passed_kwargs
    engine.close()


def test_max_input_len_follows_max_seq_len(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_seq_len=4096))
    assert engine.llm.passed_kwargs["max_input_len"] == 4096 == engine.llm.max_seq_len
    engine.close()


def test_warmup_runs_one_request_then_a_window_of_the_largest_images(stub, model_dir, monkeypatch):
    stub_env(monkeypatch, step_s=0.05)  # decode slower than submitting: the window overlaps
    cfg = make_cfg(model_dir, max_batch_size=4)
    engine = trtllm_engine.TrtLlmEngine(cfg)
    seen = []
    submit = engine.llm.generate_async

    def spy(inputs, sampling_params=None):
        seen.append((inputs["multi_modal_data"]["image"][0].size, len(seen)))
        return submit(inputs, sampling_params=sampling_params)

    engine.llm.generate_async = spy
    engine.warmup()
    largest = trtllm_engine.largest_grid(cfg.image.max_pixels)
    assert [size for size, _ in seen] == [largest] * (1 + engine.max_in_flight)
    w, h = largest
    assert (w, h) == (32 * 28, 40 * 28)  # all 1,280 patches max_pixels allows
    assert engine.llm.peak_in_flight == engine.max_in_flight  # the window went in together
    engine.close()


def test_close_is_idempotent_and_final(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    llm = engine.llm
    engine.close()
    engine.close()
    assert llm.shutdown_calls == 1
    with pytest.raises(EngineError):
        run(engine, make_requests(1))


def test_count_text_tokens_is_the_templated_prompt_without_image_pads(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    tok = engine._tokenizer
    for prompt, system in [("Describe this image.", None), ("Caption in one word", "You are")]:
        text = prompts.render_chat(engine._template, prompt, system)
        assert text.count(prompts.IMAGE_PAD) == 1
        ids = tok.encode(text, add_special_tokens=False)
        assert engine.count_text_tokens(prompt, system) == len(ids) - 1
    assert engine.count_text_tokens("Describe", None) != engine.count_text_tokens(
        "Describe", "You are a helpful"
    )
    engine.close()


def test_make_engine_builds_the_trtllm_engine(stub, model_dir):
    engine = make_engine(make_cfg(model_dir))
    assert isinstance(engine, trtllm_engine.TrtLlmEngine)
    engine.close()


def test_missing_tensorrt_llm_raises_with_install_hint(model_dir, monkeypatch):
    _purge_trtllm_modules()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="TensorRT-LLM release container"):
        trtllm_engine.TrtLlmEngine(make_cfg(model_dir))


# --- pure helpers and the static contract -------------------------------------------------------


class Recorder:
    """Records constructor kwargs; stands in for any TensorRT-LLM class in the static check."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def surface_names(section: dict) -> set[str]:
    return {name for name, desc in section.items() if not desc.startswith("property")}


LLM_NAMES = surface_names(SURFACE["LLM.__init__"]["BaseLlmArgs_fields"]) | surface_names(
    SURFACE["LLM.__init__"]["TorchLlmArgs_fields"]
)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"cuda_graphs": False, "enable_block_reuse": True}, {"tensor_parallel_size": 4}],
)
def test_every_keyword_the_engine_passes_is_in_the_json(stub, model_dir, overrides):
    api = SimpleNamespace(llmapi=SimpleNamespace(KvCacheConfig=Recorder, CudaGraphConfig=Recorder))
    kwargs = trtllm_api.llm_kwargs(make_cfg(model_dir, **overrides), api)
    assert set(kwargs) <= LLM_NAMES, set(kwargs) - LLM_NAMES
    assert set(kwargs["kv_cache_config"].kwargs) <= set(SURFACE["KvCacheConfig"]["fields"])
    if kwargs["cuda_graph_config"] is not None:
        assert set(kwargs["cuda_graph_config"].kwargs) <= set(SURFACE["CudaGraphConfig"]["fields"])
    for sampling in ({}, {"temperature": 0.7, "top_k": 40, "repetition_penalty": 1.1}):
        cfg = make_cfg(model_dir, sampling=sampling)
        names = set(trtllm_api.sampling_kwargs(cfg, [151645, 151643]))
        assert names <= set(SURFACE["SamplingParams"]["fields"]), names
        penalised = set(trtllm_api.llm_kwargs(cfg, api))  # sampler_type when the penalty is on
        assert penalised <= LLM_NAMES, penalised - LLM_NAMES
    assert {"max_tokens", "stop_token_ids"} <= names and "sampler_type" in penalised
    guided = trtllm_api.llm_kwargs(make_cfg(model_dir, structured={"json_schema": MODERATION}), api)
    assert "guided_decoding_backend" in guided and set(guided) <= LLM_NAMES
    # The engine adds these two names to SamplingParams(...) and GuidedDecodingParams(...).
    assert "guided_decoding" in SURFACE["SamplingParams"]["fields"]
    assert "json" in SURFACE["GuidedDecodingParams"]["fields"]


def _attribute_uses(tree: ast.AST, owner: str) -> set[str]:
    """Attributes read off a plain name ``owner`` (``output.outputs`` -> 'outputs')."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == owner
    }


def test_every_api_name_in_the_engine_source_is_in_the_json():
    """Reads the engine's source: module attributes, LLM methods and result fields it touches."""
    tree = ast.Module([n for f in ENGINE_SOURCES for n in ast.parse(f.read_text()).body], [])
    kv_home = SURFACE["KvCacheConfig"]["import"].rsplit(".", 2)[1]  # 'llmapi'
    assert _attribute_uses(tree, "api") <= {"LLM", "SamplingParams", kv_home, "__version__"}
    llmapi_names = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == kv_home
    }
    assert llmapi_names == {"KvCacheConfig", "CudaGraphConfig", "GuidedDecodingParams"}
    assert llmapi_names <= set(SURFACE)
    assert SURFACE["GuidedDecodingParams"]["import"].startswith("tensorrt_llm.llmapi.")
    llm_methods = _attribute_uses(tree, "llm") | {  # llm.shutdown(), self.llm.generate_async()
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "llm"
    }
    assert {"generate_async", "shutdown"} <= llm_methods
    assert llm_methods and {f"LLM.{m}" for m in llm_methods} <= set(SURFACE), llm_methods
    output_attrs = {a.split(" ")[0] for a in SURFACE["RequestOutput"]["attributes"]}
    assert _attribute_uses(tree, "output") <= output_attrs
    assert _attribute_uses(tree, "completion") <= set(SURFACE["CompletionOutput"]["fields"])
    methods = {m.split("(")[0] for m in SURFACE["RequestOutput"]["methods"]}
    assert _attribute_uses(tree, "handle") <= methods
    executor = SURFACE["GenerationExecutor"]
    executor_names = {
        e.split(" ")[0].split("(")[0] for e in executor["methods"] + executor["attributes"]
    }
    assert _attribute_uses(tree, "executor") and _attribute_uses(tree, "executor") <= executor_names
    call_kwargs = {
        kw.arg
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "generate_async"
        for kw in n.keywords
    }
    assert call_kwargs and call_kwargs <= set(SURFACE["LLM.generate_async"]["params"])


def test_prompt_inputs_keys_are_text_prompt_keys(stub, model_dir):
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    (req,) = make_requests(1)
    inputs = engine.inputs(req)
    assert set(inputs) <= set(SURFACE["PromptInputs_dict_keys"]["TextPrompt"])
    assert inputs["multi_modal_data"] == {"image": [req.image]}
    engine.close()


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({}, {"temperature": None, "top_p": None, "top_k": 1, "repetition_penalty": None}),
        (
            {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.05},
            {"temperature": 0.7, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.05},
        ),
        ({"temperature": 1.0, "top_k": 50}, {"temperature": 1.0, "top_p": 1.0, "top_k": 50}),
    ],
)
def test_sampling_mapping(model_dir, sampling, expected):
    kwargs = trtllm_api.sampling_kwargs(make_cfg(model_dir, sampling={"seed": 7, **sampling}))
    assert kwargs["max_tokens"] == 64 and kwargs["seed"] == 7
    assert {k: kwargs[k] for k in expected} == expected


def test_vision_token_counting():
    image_id, vocab = 151655, 152064
    ids = [1, 2, image_id, image_id, image_id, 3]
    assert outputs.count_vision_tokens(ids, image_id, vocab) == 3
    # Versions that replace image pads with out-of-vocabulary ids before returning them.
    remapped = [1, 2, vocab + 1, vocab + 1, 3]
    assert outputs.count_vision_tokens(remapped, image_id, vocab) == 2
    assert outputs.count_vision_tokens([1, 2, 3], image_id, None) == 0


def test_image_token_id_resolution(model_dir):
    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 42, unk_token_id=0)
    assert prompts.image_token_id({"image_token_id": 7}, tok) == 7
    assert prompts.image_token_id({}, tok) == 42
    unknown = SimpleNamespace(convert_tokens_to_ids=lambda t: 0, unk_token_id=0)
    assert prompts.image_token_id({}, unknown) == prompts.IMAGE_TOKEN_ID
    cfg = prompts.read_model_config(str(model_dir))
    assert prompts.vocab_size(cfg) == cfg["vocab_size"]
    assert prompts.vocab_size({"text_config": {"vocab_size": 5}}) == 5
    assert prompts.read_model_config("Qwen/Qwen2.5-VL-7B-Instruct") == {}


def test_render_chat_falls_back_only_when_jinja_is_missing():
    class NoJinja:
        def apply_chat_template(self, *args, **kwargs):
            raise ImportError("apply_chat_template requires jinja2")

    class Batched:
        def apply_chat_template(self, messages, **kwargs):
            assert kwargs == {"tokenize": False, "add_generation_prompt": True}
            assert messages[-1]["content"][0] == {"type": "image"}
            return ["rendered"]

    assert prompts.render_chat(NoJinja(), "Hi", None) == prompts.qwen_chat_text("Hi", None)
    assert prompts.render_chat(Batched(), "Hi", "Sys") == "rendered"


def test_builtin_template_equals_qwen_template(model_dir):
    """The jinja-less fallback renders exactly what the model's own template renders."""
    pytest.importorskip("jinja2")
    source = prompts.load_template_source(str(model_dir))
    for prompt, system in [("Describe this image.", None), ("Caption", "Be brief."), ("Hi", "")]:
        rendered = prompts.render_chat(source, prompt, system)
        assert rendered == prompts.qwen_chat_text(prompt, system)


# --- whole jobs ---------------------------------------------------------------------------------


def run_cli_job(tmp_path: Path, job: Path, pythonpath: list[Path], timeout: float, env_extra=None):
    """``qvl-batch run`` in a subprocess that starts its own local Ray, whose workers inherit
    this environment (PYTHONPATH included); RAY_TMPDIR keeps it off any other local cluster."""
    ray_tmp = tempfile.mkdtemp(prefix="qvlray", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    paths = [str(p) for p in pythonpath] + [str(REPO)] + [env.get("PYTHONPATH", "")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        RAY_TMPDIR=ray_tmp,
        RAY_USAGE_STATS_ENABLED="0",
        **(env_extra or {}),
    )
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress"]
    try:
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_exactly_once(data_dir: Path, output: Path) -> tuple[list[dict], list[dict]]:
    data, errors = read_output(output)
    ids_in = sorted(r["id"] for r in input_rows(data_dir))
    assert sorted([r["id"] for r in data] + [r["id"] for r in errors]) == ids_in
    return data, errors


def prepared_image(image_bytes: bytes):
    """The image as the runner hands it to the engine (the job's default image settings)."""
    from qvl_batch.config import ImageConfig
    from qvl_batch.rows.images import prepare_image

    return prepare_image(image_bytes, ImageConfig()).image


def row_sha(row: dict) -> str:
    """The stand-in's fault key for an input row: the sha256 of its image as the engine gets it."""
    return hashlib.sha256(prepared_image(row["image"]).tobytes()).hexdigest()


def stub_answers(api, model_dir: Path, data_dir: Path) -> dict[str, str]:
    """id -> the stand-in's deterministic answer for every decodable input row."""
    surface = api._surface
    source = prompts.load_template_source(str(model_dir))
    prompt = prompts.render_chat(source, "Describe this image.", None)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = surface.ToyTokenizer(config["image_token_id"], config["vocab_size"])
    sampling = api.SamplingParams(max_tokens=64, seed=0)
    answers = {}
    for row in input_rows(data_dir):
        if row["kind"] != "corrupt":
            image = prepared_image(row["image"])
            answers[row["id"]] = surface.fake_completion(prompt, [image], sampling, tokenizer).text
    return answers


def good_rows(data_dir: Path, n: int, offset: int) -> list[dict]:
    rows = [r for r in input_rows(data_dir) if r["kind"] != "corrupt"]
    return rows[offset : offset + n]


def trtllm_job(
    tmp_path: Path,
    dataset: Path,
    model_dir: Path,
    behaviour: dict,
    actors: int = 2,
    job_extra: dict | None = None,
    **trt,
):
    """Run a job with the trtllm engine on the stand-in; returns (process, output, stats)."""
    out, stats = tmp_path / "out", tmp_path / "stub-stats"
    stats.mkdir()
    trt = {"max_batch_size": 4, "max_inflight_requests": 8, **trt}
    engine = {"name": "trtllm", "model": str(model_dir), "warmup": False, "trtllm": trt}
    cluster = {"num_actors": actors, "address": None, "local_num_cpus": 2}
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        None,
        engine=engine,
        cluster=cluster,
        **(job_extra or {}),
    )
    behaviour = {"step_s": 0.003, "stats_dir": str(stats), **behaviour}
    env = {"TRTLLM_STUB": json.dumps(behaviour)}
    proc = run_cli_job(tmp_path, job, [STUB_DIR], timeout=240, env_extra=env)
    seen = [json.loads(p.read_text()) for p in stats.glob("*.json")]
    return proc, out, seen


def check_stub_output(api, model_dir, dataset, out, expected_errors: dict[str, str]):
    """Exactly once; data texts are the stand-in's answers; errors are the corrupt inputs plus
    ``expected_errors`` (id -> code)."""
    data, errors = assert_exactly_once(dataset, out)
    answers = stub_answers(api, model_dir, dataset)
    for row in data:
        assert row["text"] == answers[row["id"]], row["id"]
        assert row["engine"] == "trtllm" and row["engine_version"] == "0.0.0+stub"
        assert row["output_tokens"] == len(row["text"].split())
        assert row["vision_tokens"] == (row["resized_width"] // 28) * (row["resized_height"] // 28)
        assert row["prompt_tokens"] > row["vision_tokens"]
    corrupt = {
        i for i, r in {r["id"]: r for r in input_rows(dataset)}.items() if r["kind"] == "corrupt"
    }
    got = {r["id"]: r["error_code"] for r in errors}
    assert set(got) == corrupt | set(expected_errors)
    assert {i: got[i] for i in expected_errors} == expected_errors
    return data, errors


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_streams_into_the_trtllm_engine_exactly_once(stub, tmp_path, dataset, model_dir):
    proc, out, seen = trtllm_job(tmp_path, dataset, model_dir, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_stub_output(stub, model_dir, dataset, out, {})
    assert len(seen) == 2, seen  # one LLM per actor
    for llm in seen:
        assert llm["submit_threads"] == 1 and llm["violations"] == 0, llm  # one submitter
        assert llm["peak_in_flight"] <= 8, llm  # never above engine.trtllm.max_inflight_requests
    # More than one batch's worth inside at once: requests waited in the scheduler.
    assert max(llm["peak_in_flight"] for llm in seen) > 4, seen
    assert max(llm["peak_running"] for llm in seen) == 4, seen


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_executor_mid_job_replaces_the_actor(stub, tmp_path, dataset, model_dir):
    behaviour = {"die_after": 40, "die_once": str(tmp_path / "died-once")}
    proc, out, _ = trtllm_job(tmp_path, dataset, model_dir, behaviour)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "died-once").exists(), "the executor never died: the test proves nothing"
    check_stub_output(stub, model_dir, dataset, out, {})
    metrics = json.loads((out / "_metrics.json").read_text())["summary"]
    assert metrics["actor_restarts"] >= 1, metrics
    assert "executor is dead" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_request_that_never_completes_ends_as_a_timeout_row(stub, tmp_path, dataset, model_dir):
    (hung,) = good_rows(dataset, 1, offset=7)
    sha = row_sha(hung)
    # step_s: the other rows keep answering for several seconds, past both of its tries
    behaviour = {"hang": [sha], "step_s": 0.02}
    proc, out, _ = trtllm_job(tmp_path, dataset, model_dir, behaviour, request_timeout_s=1.0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, errors = check_stub_output(stub, model_dir, dataset, out, {hung["id"]: "ENGINE_TIMEOUT"})
    (row,) = [r for r in errors if r["id"] == hung["id"]]
    assert "2 tries" in row["error_message"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_request_that_hangs_every_executor_ends_as_a_stall_row_in_a_one_actor_job(
    stub, tmp_path, dataset, model_dir
):
    """The stand-in never answers one image (its request_timeout_s is 600 s): with one actor,
    the watchdog (limits.stall_s 2) declares the engine dead once only that request is left
    inside, the row stalls again alone, and the job completes exactly once."""
    (hung,) = good_rows(dataset, 1, offset=7)
    sha = row_sha(hung)
    t0 = time.monotonic()
    proc, out, _ = trtllm_job(
        tmp_path, dataset, model_dir, {"hang": [sha]}, actors=1, job_extra={"limits__stall_s": 2}
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_stub_output(stub, model_dir, dataset, out, {hung["id"]: "ENGINE_STALL"})
    metrics = json.loads((out / "_metrics.json").read_text())["summary"]
    # rows keep flowing past the hung one, so it is alone inside when the watchdog fires: two
    # stalls alone condemn it (three if other rows were still inside at the first)
    assert 2 <= metrics["engine_stalls"] == metrics["actor_restarts"] <= 3, metrics
    assert took < 200, took  # three stalls and actor starts, not 600 s timeouts


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_poison_row_killing_the_process_while_streaming_is_isolated(
    stub, tmp_path, dataset, model_dir
):
    (poison,) = good_rows(dataset, 1, offset=11)
    sha = row_sha(poison)
    proc, out, _ = trtllm_job(tmp_path, dataset, model_dir, {"crash": [sha]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_stub_output(stub, model_dir, dataset, out, {poison["id"]: "ENGINE_CRASH"})
    metrics = json.loads((out / "_metrics.json").read_text())["summary"]
    # A death with the stream's rows inside (all suspects then run alone), two deaths alone.
    assert 2 <= metrics["actor_restarts"] <= 3, metrics


# --- the real TensorRT-LLM (NVIDIA's container, a GPU, a Qwen2.5-VL checkpoint) ------------------


def real_model_or_skip() -> str:
    """The model dir for real runs, or skip: needs the real tensorrt_llm and QVL_TRTLLM_MODEL."""
    assert str(STUB_DIR) not in sys.path
    _purge_trtllm_modules()
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip("tensorrt_llm not installed: runs in the TensorRT-LLM container")
    model = os.environ.get("QVL_TRTLLM_MODEL")
    if not model:
        pytest.skip("QVL_TRTLLM_MODEL not set: point it at a Qwen2.5-VL checkpoint directory")
    return model


@pytest.mark.trtllm
@pytest.mark.gpu
@pytest.mark.timeout(1200)
def test_real_tensorrt_llm_engine_generates():
    model = real_model_or_skip()
    cfg = make_cfg(model, sampling={"max_tokens": 16}, max_batch_size=8, max_seq_len=4096)
    engine = trtllm_engine.TrtLlmEngine(cfg)
    try:
        assert not engine.version.endswith("+stub")
        requests = make_requests(3, prompt="Describe this image.")
        results = {r.key: r for r in run(engine, requests)}
        for req in requests:
            res = results[req.key]
            assert res.error_code is None, res.error_message
            assert res.text and res.finish_reason in ("stop", "length")
            assert 1 <= res.output_tokens <= 16
            assert res.vision_tokens == req.vision_tokens
            # Our template + tokenizer must count exactly what TensorRT-LLM fed the model.
            text_tokens = engine.count_text_tokens(req.prompt, req.system)
            assert res.prompt_tokens == text_tokens + res.vision_tokens
    finally:
        engine.close()


@pytest.mark.trtllm
@pytest.mark.gpu
@pytest.mark.timeout(1200)
def test_real_tensorrt_llm_guided_answers_parse():
    model = real_model_or_skip()
    cfg = make_cfg(
        model,
        sampling={"max_tokens": 256},  # ample: a one-line answer of this schema is ~30 tokens
        structured={"json_schema": MODERATION, "guided": "required"},
        max_batch_size=8,
        max_seq_len=4096,
    )
    engine = trtllm_engine.TrtLlmEngine(cfg)
    parser = OutputParser(MODERATION)
    try:
        assert engine.guided
        requests = make_requests(3, prompt="Moderate this image. Answer in JSON.")
        for res in run(engine, requests):
            assert res.error_code is None, res.error_message
            assert res.finish_reason == "stop", res.text
            _, error = parser.parse(res.text, res.finish_reason)
            # xgrammar leaves uniqueItems to the parser; every other keyword is enforced.
            assert error is None or "non-unique" in error, error
    finally:
        engine.close()


@pytest.mark.trtllm
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_tensorrt_llm_job_is_exactly_once(tmp_path, dataset):
    model = real_model_or_skip()
    out = tmp_path / "out"
    engine = {"name": "trtllm", "model": model, "trtllm": {"max_seq_len": 4096}}
    cluster = {"num_actors": 1, "address": None, "num_gpus_per_actor": 1}
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        None,
        engine=engine,
        cluster=cluster,
        sampling={"max_tokens": 16},
    )
    proc = run_cli_job(tmp_path, job, [], timeout=1700)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data, _ = assert_exactly_once(dataset, out)
    assert data and all(r["text"] and r["engine"] == "trtllm" for r in data)
