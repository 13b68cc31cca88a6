"""Elastic start: actors that die while loading are replaced (also after a driver restart),
work begins with the actors that are ready and late ones join, and a deterministic start
failure stops the job at once with the engine's own error."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit

from ..conftest import check_fake_output, write_job
from ..jobprocs import job_actors, job_id_of, start_driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOAD_S = 3.0


def _kill_a_loading_actor(job_id: str, proc, deadline_s: float = 30) -> int:
    """SIGKILL one of the job's actors while its engine loads (its constructor runs)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        loading = [pid for pid, phase in job_actors(job_id) if phase == "loading"]
        if loading:
            os.kill(loading[0], signal.SIGKILL)
            return loading[0]
        time.sleep(0.02)
    raise AssertionError("no actor of this job started loading")


def _markers(out) -> int:
    return len(list((out / "_state" / "units").glob("*.json")))


def test_actors_killed_while_loading_are_replaced_also_after_a_driver_restart(
    tmp_path, dataset, ray_head
):
    out = tmp_path / "out"
    fake = {"load_s": LOAD_S, "batch_latency_s": 0.3}
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head, engine__fake=fake)
    proc = start_driver(job)
    job_id = job_id_of(out)
    _kill_a_loading_actor(job_id, proc)
    deadline = time.monotonic() + 120
    while _markers(out) < 2:  # work went on with the other actor and the replacement
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # the driver: its actors go with it
    proc.wait(timeout=30)
    proc = start_driver(job)
    _kill_a_loading_actor(job_id, proc)  # the new driver's actors carry the same job id
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.OK, log
    assert "did not start" in log  # the death was seen at start-up and replaced
    check_fake_output(dataset, out)
    assert verify_output(str(out)).ok
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["summary"]["actor_restarts"] >= 1
    first, last = metrics["actors_live"][0], metrics["actors_live"][-1]
    assert first[1] == 0 and 0 <= first[0] < last[0] and last[1] == 2


def test_a_bad_model_path_fails_fast_with_exit_2_and_the_engines_error(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    engine = {"name": "hf", "model": str(missing), "device": "cpu"}
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head, engine=engine)
    t0 = time.monotonic()
    proc = start_driver(job)
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.CONFIG, log
    assert "engine failed to start" in log and "no-such-model" in log, log
    # Two attempts per slot at most, never limits.max_actor_restarts (50) of them.
    assert log.count("did not start") <= 2, log
    assert time.monotonic() - t0 < 120
    assert not list((out / "_state" / "units").glob("*.json"))  # no work was done


def _hold_cpus(ray_head: str, cpus: int):
    """An actor of this test holding ``cpus`` of the session Ray's 4 CPUs."""
    import ray

    ray.init(address=ray_head, ignore_reinit_error=True, logging_level="ERROR")

    @ray.remote(num_cpus=cpus)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote(), timeout=60)
    return holder


def test_a_job_starts_with_the_actors_it_can_place_and_a_late_one_joins(
    tmp_path, dataset, ray_head
):
    """The session's Ray has 4 CPUs; another actor of this test holds 3 of them, so the job's
    second actor (1 CPU each) cannot be placed until the test releases them."""
    import ray

    out = tmp_path / "out"
    fake = {"batch_latency_s": 0.4}
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head, engine__fake=fake)
    holder = _hold_cpus(ray_head, 3)
    try:
        proc = start_driver(job)
        deadline = time.monotonic() + 120
        while _markers(out) < 1:  # the job runs with the one actor it could place
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
    finally:
        ray.kill(holder)  # the late actor can now be placed
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.OK, log
    check_fake_output(dataset, out)
    metrics = json.loads((out / "_metrics.json").read_text())
    live = [n for _, n in metrics["actors_live"]]
    assert live[:3] == [0, 1, 2], metrics["actors_live"]  # one, then the late one joined
    assert all(n > 0 for n in metrics["units_by_actor"]), metrics["units_by_actor"]
    assert len(metrics["actors"]) == 2


def test_too_few_actors_by_the_start_timeout_fail_the_job_with_a_clear_message(
    tmp_path, dataset, ray_head
):
    import ray

    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"batch_latency_s": 0.4},
        cluster={"num_actors": 2, "address": ray_head, "min_actors": 2, "start_timeout_s": 4},
    )
    holder = _hold_cpus(ray_head, 3)
    try:
        proc = start_driver(job)
        log = proc.communicate(timeout=240)[0].decode()
    finally:
        ray.kill(holder)
    assert proc.returncode == Exit.FAILED, log
    assert "only 1 of 2 actors ready after cluster.start_timeout_s=4s" in log, log
    assert "cluster.min_actors=2" in log and "actors live: 1/2" in log


def test_losing_the_only_actor_late_in_a_job_waits_for_its_replacement(tmp_path, dataset, ray_head):
    """cluster.start_timeout_s counts from when the job fell below min_actors, not from its
    start: a death 10 s into a job with a 6 s timeout is replaced, not fatal."""
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"batch_latency_s": 0.4, "exit_after_rows": 200},
        cluster={"num_actors": 1, "address": ray_head, "min_actors": 1, "start_timeout_s": 6},
    )
    proc = start_driver(job)
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.OK, log
    check_fake_output(dataset, out)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["summary"]["actor_restarts"] == 1
    live = [n for _, n in metrics["actors_live"]]
    assert live == [0, 1, 0, 1], metrics["actors_live"]  # down to none, then replaced
    assert metrics["actors_live"][2][0] > 6  # the death came after the start timeout
