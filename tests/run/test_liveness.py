"""Liveness (liveness.py): an engine that stops answering is declared dead and its job goes on;
a slow engine that keeps answering is left alone; the progress line moves between commits."""

from __future__ import annotations

import time

import pytest

from qvl_batch.errors import Exit
from qvl_batch.run.driver import run_job
from qvl_batch.run.liveness import Watchdog, beat_interval, silence_limit
from qvl_batch.run.progress import Progress
from qvl_batch.run.validate import load_job

from ..conftest import check_fake_output, input_rows, write_job

# ---- the watchdog on a clock of its own ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _watchdog(stall_s: float = 10.0):
    clock, state, calls = Clock(), {"inside": 0, "running": 0}, {"stall": [], "beat": []}
    dog = Watchdog(
        stall_s,
        inside=lambda: state["inside"],
        running_rows=lambda: state["running"],
        on_stall=lambda inside, quiet: calls["stall"].append((inside, quiet)),
        beat=lambda *beat: calls["beat"].append(beat),
        clock=clock,
    )
    return dog, clock, state, calls


def test_an_engine_holding_rows_and_silent_past_stall_s_is_declared_stalled_once():
    dog, clock, state, calls = _watchdog(10.0)
    clock.now += 50  # idle for long: nothing inside, nothing to judge
    assert not dog.check() and calls["stall"] == []
    dog.entered(0)  # rows enter an empty engine: its clock starts now
    state["inside"] = 8
    clock.now += 9
    assert not dog.check()
    clock.now += 2  # 11 s without a result
    assert dog.check() and calls["stall"] == [(8, 11.0)]
    clock.now += 20
    assert dog.check() and len(calls["stall"]) == 1  # declared once


def test_results_and_signs_of_life_keep_a_slow_engine_alive():
    dog, clock, state, calls = _watchdog(10.0)
    dog.entered(0)
    state["inside"] = 8
    for _ in range(10):  # 90 s in all, never 10 s without a result or a decode step
        clock.now += 9
        dog.progress()
        assert not dog.check()
    dog.entered(8)  # more rows entering a busy engine do not reset its clock
    clock.now += 9
    dog.entered(8)
    clock.now += 2
    assert dog.check() and calls["stall"] == [(8, 11.0)]


def test_heartbeats_carry_rows_inside_rows_done_and_the_silence():
    dog, clock, state, calls = _watchdog(10.0)
    state.update(inside=3, running=17)
    dog.entered(0)
    clock.now += 4
    dog.check()
    assert calls["beat"] == [(3, 17, 4.0)]
    state["inside"] = 0
    dog.check()
    assert calls["beat"][-1] == (0, 17, 0.0)  # an empty engine is not silent


def test_the_drivers_limit_is_past_the_actors_own():
    for stall_s in (0.5, 2, 300):
        assert silence_limit(stall_s) > stall_s + 2 * beat_interval(stall_s)
    assert beat_interval(300) == 5.0 and beat_interval(0.1) == 0.2


def test_the_progress_line_counts_rows_in_running_units_and_names_a_silent_engine():
    progress = Progress(1000, bar=False)
    progress.update(100, 2)
    progress.running(40, 3.0)
    line = progress.line()
    assert "100/1,000 rows" in line and "+40 running" in line and "quiet" not in line
    progress.running(40, 95.0)
    assert "an engine quiet 95s" in progress.line()
    assert progress.eta_s() is not None
    # Backup copies report the same unit's rows twice: never more running than rows left.
    progress.running(1500, 0.0)
    assert "+900 running" in progress.line() and progress.eta_s() == 0


# ---- whole jobs ---------------------------------------------------------------------------

STALL_S = 2.0


def _one_good_id(dataset, offset: int = 3) -> str:
    rows = [r for r in input_rows(dataset) if r["kind"] != "corrupt" and r["image"]]
    return rows[offset]["id"]


def _job(tmp_path, dataset, ray_head, fake: dict, stall_s: float = STALL_S, **extra):
    return write_job(
        tmp_path / "job.yaml",
        dataset,
        tmp_path / "out",
        ray_head,
        cluster__num_actors=1,
        limits__stall_s=stall_s,
        engine__fake=fake,
        **extra,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_engine_that_hangs_on_a_row_is_replaced_and_the_job_completes_once(
    tmp_path, dataset, ray_head
):
    hung = _one_good_id(dataset)
    # The first engine to meet the row hangs on it for an hour; its replacement does not.
    markers = tmp_path / "markers"
    markers.mkdir()
    fake = {"slow_ids": [hung], "slow_s": 3600, "slow_times": 1, "marker_dir": str(markers)}
    t0 = time.monotonic()
    summary = run_job(load_job(_job(tmp_path, dataset, ray_head, fake)), progress_bar=False)
    took = time.monotonic() - t0
    assert summary.exit_code == Exit.OK, summary.lines()
    check_fake_output(dataset, tmp_path / "out")  # every row once, the hung one answered
    assert summary.engine_stalls == 1 and summary.actor_restarts == 1, summary.lines()
    assert took < 30 * STALL_S, took  # a few stall_s and one actor start, not an hour


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_row_that_hangs_every_engine_ends_as_an_engine_stall_row(tmp_path, dataset, ray_head):
    hung = _one_good_id(dataset, offset=5)
    fake = {"slow_ids": [hung], "slow_s": 3600}  # every engine that meets it hangs
    summary = run_job(load_job(_job(tmp_path, dataset, ray_head, fake)), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    _, errors = check_fake_output(dataset, tmp_path / "out", {hung: "ENGINE_STALL"})
    (row,) = [r for r in errors if r["id"] == hung]
    assert "stopped answering" in row["error_message"]
    # Its batch stalled (every row in it then ran alone), then it stalled alone twice.
    assert summary.engine_stalls == summary.actor_restarts == 3, summary.lines()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_healthy_engine_slower_than_stall_s_per_batch_is_not_killed(tmp_path, dataset, ray_head):
    # Each batch decodes its longest answer (3-16 tokens) at 0.2 s a step: 3.2 s for most
    # batches, over 2x stall_s, with a sign of life every decode step. Three units of 80 rows,
    # all in flight, run as a few full batches.
    fake = {"token_latency_s": 0.2}
    job = _job(
        tmp_path,
        dataset,
        ray_head,
        fake,
        stall_s=1.5,
        batching__max_batch_size=80,
        batching__unit_rows=80,
        batching__units_in_flight_per_actor=3,
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    check_fake_output(dataset, tmp_path / "out")
    assert summary.engine_stalls == 0 and summary.actor_restarts == 0, summary.lines()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_wedged_actor_process_is_killed_by_the_driver(tmp_path, dataset, ray_head):
    frozen = _one_good_id(dataset, offset=9)
    # The first actor SIGSTOPs itself on the row: its watchdog thread stops too, so only the
    # driver, missing its heartbeats, can tell.
    fake = {"freeze_ids": [frozen], "exit_incarnations": 1}
    summary = run_job(load_job(_job(tmp_path, dataset, ray_head, fake)), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    check_fake_output(dataset, tmp_path / "out")
    assert summary.engine_stalls == 1 and summary.actor_restarts == 1, summary.lines()


def test_an_exiting_actor_takes_its_child_processes_with_it():
    """An engine's worker process (TensorRT-LLM's MPI worker) would outlive the actor and keep
    the GPU: kill_descendants reaches children's children too. Run in a child process, so it
    kills only what that process started."""
    import subprocess
    import sys

    import psutil

    code = (
        "import subprocess, sys, time\n"
        "from qvl_batch.run.liveness import kill_descendants\n"
        "child = subprocess.Popen(['bash', '-c', 'sleep 300 & sleep 300'])\n"
        "time.sleep(0.5)\n"
        "print(' '.join(map(str, kill_descendants())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3, out  # bash and its two sleeps
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []
