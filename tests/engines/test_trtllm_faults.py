"""The trtllm engine against TensorRT-LLM 1.2's real failures, on the harsh stand-in: a killed
worker (nothing answers, calls into it block), a fatal CUDA error sent to every active request
(and to every later step), an out-of-memory request, a background shutdown, a shutdown that
blocks. Each test that shows the engine surviving a failure also shows the failure biting what
the engine did before (the job hangs, or every row becomes an error)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from qvl_batch.engines.trtllm import engine as trtllm_engine
from qvl_batch.engines.trtllm import faults

from ..conftest import write_job
from .conftest import STUB_DIR
from .test_trtllm_contract import (
    Sink,
    check_stub_output,
    good_rows,
    make_cfg,
    make_requests,
    pixels_sha,
    row_sha,
    run_cli_job,
    stub_env,
    trtllm_job,
)

CUDA = "Encountered an error in forward function: CUDA error: an illegal memory access"


def submit_all(engine, requests, timeout: float = 20.0) -> Sink:
    """Start ``engine``, submit ``requests``; the sink once all answered or the engine failed."""
    sink = Sink()
    engine.start(sink)
    engine.submit(requests)
    with sink._cond:
        sink._cond.wait_for(lambda: len(sink.results) >= len(requests) or sink.failed, timeout)
    return sink


# --- the engine alone ----------------------------------------------------------------------------


def test_a_sticky_cuda_error_declares_the_engine_dead_instead_of_failing_every_row(
    stub, model_dir, monkeypatch
):
    requests = make_requests(12)
    stub_env(monkeypatch, step_error=[pixels_sha(requests[5])], sticky=True, step_s=0.02)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_batch_size=4))
    sink = submit_all(engine, requests)
    assert sink.failed is not None and "illegal memory access" in str(sink.failed)
    assert [r for r in sink.results if r.error_code] == []  # no row condemned
    engine.close()
    # It bites: told nothing of fatal messages and without the breaker, the engine turns every
    # row after the error into ENGINE_ERROR and never dies.
    monkeypatch.setattr(trtllm_engine, "is_fatal", lambda exc: False)
    monkeypatch.setattr(trtllm_engine.Breaker, "error", lambda self: False)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_batch_size=4))
    sink = submit_all(engine, requests)
    assert sink.failed is None
    assert sum(r.error_code == "ENGINE_ERROR" for r in sink.results) >= 8
    engine.close()


def test_request_errors_of_a_whole_batch_in_a_row_trip_the_breaker(stub, model_dir, monkeypatch):
    """A step error whose message names nothing known still fails every active request: four
    (max_batch_size) errors with no success between them are the engine's, not the rows'."""
    requests = make_requests(12)
    behaviour = {"step_error_message": "Encountered an error in forward function: boom"}
    stub_env(monkeypatch, step_error=[pixels_sha(requests[5])], sticky=True, **behaviour)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir, max_batch_size=4))
    sink = submit_all(engine, requests)
    assert sink.failed is not None and "4 requests failed in a row" in str(sink.failed)
    assert sum(bool(r.error_code) for r in sink.results) < 4
    engine.close()
    breaker = faults.Breaker(3)
    assert [breaker.error(), breaker.error()] == [False, False]
    breaker.success()
    assert [breaker.error(), breaker.error(), breaker.error()] == [False, False, True]


def test_an_out_of_memory_request_is_tried_once_more_then_an_error_row(
    stub, model_dir, monkeypatch
):
    requests = make_requests(4)
    once, always = pixels_sha(requests[1]), pixels_sha(requests[2])
    stub_env(monkeypatch, oom_once=[once], oom=[always])
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    sink = submit_all(engine, requests)
    assert sink.failed is None
    by_key = {r.key: r for r in sink.results}
    assert by_key[requests[1].key].error_code is None  # the second try ran
    bad = by_key[requests[2].key]
    assert bad.error_code == "ENGINE_ERROR" and "out of memory" in bad.error_message
    assert engine.llm.submitted == len(requests) + 2  # each out-of-memory row went in twice
    engine.close()
    assert faults.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not faults.is_fatal(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert faults.is_fatal(RuntimeError("NCCL error: unhandled system error"))


def test_the_executor_shutting_down_is_seen_with_no_response_and_no_submit(
    stub, model_dir, monkeypatch
):
    """A background error shuts the executor down; 1.2 answers none of the requests inside and
    nothing more is submitted: only the health thread, reading the shutdown flag, can tell."""
    requests = make_requests(3)
    stub_env(monkeypatch, die_after=3, hang=[pixels_sha(r) for r in requests])
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    t0 = time.monotonic()
    sink = submit_all(engine, requests, timeout=10)
    assert sink.failed is not None and time.monotonic() - t0 < 5
    assert sink.results == []
    engine.close()


def test_close_with_a_dead_worker_returns_though_the_shutdown_blocks(stub, model_dir, monkeypatch):
    stub_env(monkeypatch)
    monkeypatch.setattr(trtllm_engine, "CLOSE_TIMEOUT_S", 1.0)
    engine = trtllm_engine.TrtLlmEngine(make_cfg(model_dir))
    llm = engine.llm
    os.kill(llm.worker_pid, signal.SIGKILL)  # the stand-in's worker child
    time.sleep(0.2)
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 3
    # It bites: the shutdown itself, called as close() did before, does not return.
    stuck = threading.Thread(target=llm.shutdown, daemon=True)
    stuck.start()
    stuck.join(2)
    assert stuck.is_alive()


# --- jobs ----------------------------------------------------------------------------------------


def gone(pids: list[int]) -> bool:
    return all(
        not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_killed_mid_job_replaces_the_actor_and_condemns_no_row(
    stub, tmp_path, dataset, model_dir
):
    """The worker dies (the OOM killer): 1.2 tells the requests inside nothing and every later
    call into it blocks, so the engine's loop freezes; the actor's watchdog (limits.stall_s 2)
    replaces the actor, its child processes go with it, and the rows run again."""
    behaviour = {"kill_worker_after": 25, "kill_once": str(tmp_path / "killed-once")}
    t0 = time.monotonic()
    proc, out, seen = trtllm_job(
        tmp_path, dataset, model_dir, behaviour, actors=1, job_extra={"limits__stall_s": 2}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "killed-once").exists(), "the worker never died: the test proves nothing"
    check_stub_output(stub, model_dir, dataset, out, {})
    metrics = json.loads((out / "_metrics.json").read_text())["summary"]
    assert metrics["engine_stalls"] >= 1 and metrics["actor_restarts"] >= 1, metrics
    assert time.monotonic() - t0 < 200
    assert gone([s["worker_pid"] for s in seen]), seen


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sticky_cuda_error_mid_job_condemns_only_the_row_that_causes_it(
    stub, tmp_path, dataset, model_dir
):
    (poison,) = good_rows(dataset, 1, offset=11)
    sha = row_sha(poison)
    behaviour = {"step_error": [sha], "sticky": True}
    proc, out, seen = trtllm_job(tmp_path, dataset, model_dir, behaviour)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_stub_output(stub, model_dir, dataset, out, {poison["id"]: "ENGINE_CRASH"})
    assert "illegal memory access" in proc.stdout + proc.stderr
    assert gone([s["worker_pid"] for s in seen]), seen


@pytest.mark.timeout(120)
def test_pixel_bounds_outside_the_processors_stop_the_job_before_any_work(
    tmp_path, dataset, model_dir
):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 12845056})
    )
    out = tmp_path / "out"
    engine = {"name": "trtllm", "model": str(model)}
    job = write_job(
        tmp_path / "job.yaml", dataset, out, None, engine=engine, image={"min_pixels": 784}
    )
    proc = run_cli_job(tmp_path, job, [STUB_DIR], timeout=100, env_extra={"TRTLLM_STUB": "{}"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "image.min_pixels=784" in proc.stderr and "[3136, 12845056]" in proc.stderr
    assert not out.exists()
