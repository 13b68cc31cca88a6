"""The TensorRT-LLM stand-in itself (tests/trtllm_stub) fails as 1.2 does, switch by switch.

No engine here: each test drives the stand-in's LLM directly, so a kinder stand-in fails them.
Waits are bounded (``result(timeout=...)`` raises TimeoutError; ``block_s`` bounds the calls
1.2 blocks forever), and every worker child a test starts is killed after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from .conftest import STUB_DIR

PROMPT = "<|image_pad|> Describe this image."


@pytest.fixture
def api(stub):
    """The stand-in package, imported fresh for one test (module state such as oom_once too)."""
    return stub


@pytest.fixture
def make_llm(api, monkeypatch, tmp_path):
    """Builds stand-in LLMs with a ``TRTLLM_STUB`` behaviour; kills their workers after."""
    built = []

    def make(model: Path | None = None, max_batch_size: int = 64, **behaviour):
        monkeypatch.setenv("TRTLLM_STUB", json.dumps(behaviour))
        llm = api.LLM(model=str(model or tmp_path), max_batch_size=max_batch_size)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        worker = llm._executor_of_record.worker
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        llm._stop_scheduler()


def image(size: int = 56, seed: int = 0) -> Image.Image:
    return Image.new("RGB", (size, size), (seed * 40 % 256, seed * 90 % 256, seed * 7 % 256))


def sha(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def submit(llm, img: Image.Image, **kwargs):
    return llm.generate_async({"prompt": PROMPT, "multi_modal_data": {"image": [img]}, **kwargs})


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---- the worker child ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_worker_is_a_child_recorded_in_stats_and_ended_by_shutdown(make_llm, tmp_path):
    stats = tmp_path / "stats"
    stats.mkdir()
    llm = make_llm(stats_dir=str(stats))
    assert llm.worker_pid != os.getpid() and parent_pid(llm.worker_pid) == os.getpid()
    (written,) = [json.loads(p.read_text()) for p in stats.glob("*.json")]
    assert written["worker_pid"] == llm.worker_pid and written["pid"] == os.getpid()
    executor = llm._executor
    assert executor.is_shutdown() is False and executor.doing_shutdown is False
    llm.shutdown()
    assert llm._executor is None and executor.is_shutdown() is True
    assert executor.worker.poll() is not None and not alive(llm.worker_pid)


@pytest.mark.timeout(60)
def test_worker_survives_its_parents_death(tmp_path):
    script = (
        "import os, tensorrt_llm\n"
        f"llm = tensorrt_llm.LLM(model={str(tmp_path)!r})\n"
        "print(llm.worker_pid, os.getpid(), flush=True)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(STUB_DIR), "TRTLLM_STUB": "{}"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    worker, parent = (int(x) for x in proc.stdout.split())
    try:
        time.sleep(0.5)  # the parent is gone; nothing told the worker
        assert alive(worker), "the worker died with its parent"
        assert parent_pid(worker) != parent
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


# ---- a dead worker ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_kill_worker_leaves_every_pending_result_unanswered_and_the_executor_healthy(make_llm):
    poison, a, b = image(56, 1), image(56, 2), image(84, 3)
    llm = make_llm(kill_worker=[sha(poison)], step_s=0.2)
    outputs = [submit(llm, a), submit(llm, b), submit(llm, poison)]  # the poison last: a later
    # submit would block on the dead worker
    wait_until(lambda: llm._executor.worker.poll() is not None)
    assert llm._executor.worker.returncode == -signal.SIGKILL
    healthy_s = max(len(o.outputs[0].token_ids) for o in outputs) * 0.2  # a live worker's time
    for output in outputs:
        with pytest.raises(TimeoutError):
            output.result(timeout=healthy_s + 1.0)
    assert llm._executor is not None and llm._executor.is_shutdown() is False


@pytest.mark.timeout(60)
def test_a_worker_killed_from_outside_stops_the_scheduler(make_llm):
    llm = make_llm(step_s=0.1)
    output = submit(llm, image(56, 4))
    os.kill(llm.worker_pid, signal.SIGKILL)
    healthy_s = len(output.outputs[0].token_ids) * 0.1  # when a live worker would answer
    with pytest.raises(TimeoutError):
        output.result(timeout=healthy_s + 2.0)
    assert llm._executor.is_shutdown() is False


def _dead_llm(make_llm, **behaviour):
    llm = make_llm(hang=[sha(image(56, 5))], **behaviour)
    pending = submit(llm, image(56, 5))
    wait_until(lambda: llm.peak_running == 1)
    os.kill(llm.worker_pid, signal.SIGKILL)
    wait_until(lambda: llm._executor.worker.poll() is not None)
    return llm, pending


@pytest.mark.timeout(60)
def test_abort_shutdown_and_generate_async_block_while_the_worker_is_dead(api, make_llm):
    blocked = api._surface.StubBlocked
    llm, pending = _dead_llm(make_llm, block_s=0.5)
    for call in (pending.abort, lambda: submit(llm, image(56, 6)), llm.shutdown):
        start = time.monotonic()
        with pytest.raises(blocked):
            call()
        assert time.monotonic() - start >= 0.5
    # doing_shutdown is set before the blocking wait; _executor stays until shutdown returns.
    assert llm._executor is not None and llm._executor.doing_shutdown is True
    with pytest.raises(TimeoutError):
        pending.result(timeout=0.5)


@pytest.mark.timeout(60)
def test_dead_blocks_off_nothing_blocks_and_nothing_answers(make_llm):
    llm, pending = _dead_llm(make_llm, dead_blocks=False, block_s=5)
    start = time.monotonic()
    pending.abort()
    late = submit(llm, image(56, 6))
    llm.shutdown()
    assert time.monotonic() - start < 2.0
    assert llm._executor is None
    for output in (pending, late):
        with pytest.raises(TimeoutError):
            output.result(timeout=0.5)


# ---- step errors and OOM --------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sticky", [False, True])
def test_a_step_error_fails_every_running_request(api, make_llm, sticky):
    error = api.executor.RequestError
    poison, busy1, busy2 = image(56, 7), image(56, 8), image(56, 9)
    llm = make_llm(hang=[sha(busy1), sha(busy2)], step_error=[sha(poison)], sticky=sticky)
    busy = [submit(llm, busy1), submit(llm, busy2)]
    wait_until(lambda: llm.peak_running == 2)
    outputs = [*busy, submit(llm, poison)]
    for output in outputs:
        with pytest.raises(error, match="illegal memory access"):
            output.result(timeout=10)
    assert llm._executor.is_shutdown() is False  # the executor keeps looping
    later = [submit(llm, image(56, 10)), submit(llm, image(84, 11))]
    for output in later:
        if sticky:
            with pytest.raises(error, match="illegal memory access"):
                output.result(timeout=10)
        else:
            assert output.result(timeout=10).outputs[0].text


@pytest.mark.timeout(60)
def test_step_error_message_is_configurable(api, make_llm):
    poison = image(56, 12)
    llm = make_llm(step_error=[sha(poison)], step_error_message="CUDA error: device-side assert")
    with pytest.raises(api.executor.RequestError, match="device-side assert"):
        submit(llm, poison).result(timeout=10)


@pytest.mark.timeout(60)
def test_oom_fails_that_request_every_time_and_oom_once_only_the_first(api, make_llm):
    error = api.executor.RequestError
    always, once, fine = image(56, 13), image(56, 14), image(56, 15)
    llm = make_llm(oom=[sha(always)], oom_once=[sha(once)])
    good = submit(llm, fine)
    for _ in range(2):
        with pytest.raises(error, match="CUDA out of memory"):
            submit(llm, always).result(timeout=10)
    with pytest.raises(error, match="CUDA out of memory"):
        submit(llm, once).result(timeout=10)
    assert submit(llm, once).result(timeout=10).outputs[0].text
    assert good.result(timeout=10).outputs[0].finish_reason in ("stop", "length")


# ---- aborts ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("answer_aborted_waiting", [False, True])
def test_an_aborted_waiting_request_never_answers(make_llm, answer_aborted_waiting):
    slot, queued = image(56, 16), image(56, 17)
    llm = make_llm(
        max_batch_size=1, hang=[sha(slot)], answer_aborted_waiting=answer_aborted_waiting
    )
    running = submit(llm, slot)
    wait_until(lambda: llm.peak_running == 1)
    waiting = submit(llm, queued)
    waiting.abort()
    if answer_aborted_waiting:
        assert waiting.result(timeout=5).outputs[0].finish_reason == "cancelled"
    else:
        with pytest.raises(TimeoutError):
            waiting.result(timeout=2)
    running.abort()  # a running request does answer 'cancelled'
    assert running.result(timeout=5).outputs[0].finish_reason == "cancelled"


# ---- a background error ---------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_background_error_is_raised_by_the_next_submit_then_shutting_down(make_llm):
    llm = make_llm(die_after=2, step_s=0.2)
    submit(llm, image(56, 18))
    submit(llm, image(56, 19))  # the executor fails after this one
    executor = llm._executor
    assert executor.is_shutdown() is False  # nothing noticed yet
    with pytest.raises(RuntimeError, match="Executor worker died"):
        submit(llm, image(56, 20))
    assert executor.is_shutdown() is True and executor.doing_shutdown is True
    with pytest.raises(RuntimeError, match="LLM is shutting down"):
        submit(llm, image(56, 21))


@pytest.mark.timeout(60)
def test_a_background_error_is_raised_by_the_next_response_and_the_rest_never_answer(make_llm):
    llm = make_llm(die_after=2, step_s=0.2)
    first, second = submit(llm, image(56, 22)), submit(llm, image(56, 23))
    with pytest.raises(RuntimeError, match="Executor worker died"):
        first.result(timeout=10)
    with pytest.raises(TimeoutError):
        second.result(timeout=2)
    assert llm._executor.is_shutdown() is True
    with pytest.raises(RuntimeError, match="LLM is shutting down"):
        submit(llm, image(56, 24))


# ---- the multimodal-hash token count (R12) ---------------------------------------------------
@pytest.mark.timeout(60)
def test_hash_path_count_rejects_small_unresized_images(make_llm, tmp_path):
    llm = make_llm()
    no_resize = {"mm_processor_kwargs": {"do_resize": False}}
    with pytest.raises(AssertionError, match="hash path"):
        submit(llm, image(28, 25), **no_resize)
    assert submit(llm, image(448, 26), **no_resize).result(timeout=10).outputs[0].text
    assert submit(llm, image(28, 27)).result(timeout=10).outputs[0].text  # resized: counts agree
    # The processor's own bounds come from the model dir; hash_check off skips the count.
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 784}))
    assert submit(make_llm(model=model), image(28, 28), **no_resize).result(timeout=10)
    assert submit(make_llm(hash_check=False), image(28, 29), **no_resize).result(timeout=10)
