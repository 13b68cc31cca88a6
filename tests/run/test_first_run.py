"""A first run that goes right: a start that committed nothing does not lock its output, a small
job's units are sized for every actor and stay the same units when the job resumes, and a start
failure ends as one line, without Ray's traces."""

from __future__ import annotations

import json

import pytest

from qvl_batch.errors import Exit, ResumeRefused
from qvl_batch.run.driver import Driver
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import check_fake_output, write_job
from ..jobprocs import start_driver


@pytest.fixture
def one_group(tmp_path):
    """202 rows in one shard of one row group (a user's first small file)."""
    spec = SynthSpec(rows=202, shards=1, row_group_rows=202, max_side=64, corrupt_fraction=0)
    make_dataset(str(tmp_path / "data"), spec)
    return tmp_path / "data"


def _prepare(job, *overrides):
    """A driver's start, its lease given back (the next start in this process is a new run)."""
    driver = Driver(load_job(job, list(overrides)))
    try:
        return driver.prepare()
    finally:
        if driver.lease is not None:
            driver.lease.release()


def test_a_job_that_committed_nothing_is_replaced_by_a_changed_one(tmp_path, one_group):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", one_group, out, None)
    _, first, _ = _prepare(job)
    (out / "_metrics.json").write_text("{}")  # the failed start's closing files go too
    _, second, committed = _prepare(job, "prompt.template=Caption this image.")
    assert second["fingerprint"] != first["fingerprint"] and not committed
    saved = json.loads((out / "_job.json").read_text())
    assert saved["job_id"] == second["job_id"] and not (out / "_metrics.json").exists()
    (out / "data").mkdir()
    (out / "data" / "part-00000-00000.parquet").write_bytes(b"")  # a unit began to commit
    with pytest.raises(ResumeRefused, match="different config fingerprint"):
        _prepare(job)


def test_a_resume_keeps_the_first_runs_units_whatever_the_actor_count(tmp_path, one_group):
    job = write_job(tmp_path / "job.yaml", one_group, tmp_path / "out", None)
    plan, saved, _ = _prepare(job, "batching.unit_rows=512", "cluster.num_actors=2")
    ids = [u.unit_id for u in plan.units()]
    assert len(ids) >= 4 and saved["unit_rows"] == plan.unit_rows < 512
    again, _, _ = _prepare(job, "batching.unit_rows=512", "cluster.num_actors=8")
    assert [u.unit_id for u in again.units()] == ids
    assert [u.num_rows for u in again.units()] == [u.num_rows for u in plan.units()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_start_is_one_line_and_the_corrected_run_succeeds(tmp_path, dataset):
    """The engine's constructor raises: exit 2, the cause in one line, no Ray traces; the run
    with the fault fixed and another prompt then succeeds in the same output."""
    out = tmp_path / "out"
    cluster = {"num_actors": 2, "address": None, "local_num_cpus": 2}
    fake = {"fail_load": "bad weights in model.safetensors"}
    job = write_job(tmp_path / "job.yaml", dataset, out, None, cluster=cluster, engine__fake=fake)
    proc = start_driver(job)
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.CONFIG, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("qvl-batch: error: engine failed to start") and "bad weights" in last
    assert "Traceback" not in log and "UnitWorker pid=" not in log, log
    prompt = "Caption this image."
    proc = start_driver(job, overrides=["engine.fake.fail_load=", f"prompt.template={prompt}"])
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == Exit.OK, log
    assert "committed nothing" in log
    check_fake_output(dataset, out, prompt=prompt)


def test_an_actors_warnings_and_errors_reach_the_driver_one_line_each():
    """With Ray's forwarding of worker output off, an actor's own messages go through the
    recorder (the driver logs what ``news`` returns as its own lines)."""
    import logging
    from types import SimpleNamespace

    from qvl_batch.run.recorder import FlightRecorder, relay_logs

    recorder = FlightRecorder()
    handle = SimpleNamespace(said=SimpleNamespace(remote=recorder.said))  # stands in for Ray's
    relay_logs(handle, 3)
    try:
        engine_log = logging.getLogger("qvl_batch.engines.trtllm.engine")
        engine_log.info("loaded")  # not a warning: stays in the actor
        engine_log.error("engine died (CUDA error: an illegal memory access)\n  frame 1\n  frame 2")
        logging.getLogger("qvl_batch.run.actor").warning("image warm-up failed: x")
    finally:
        relay_logs(None, 0)
    assert recorder.news() == [
        (
            3,
            logging.ERROR,
            "engine died (CUDA error: an illegal memory access) [2 more lines in "
            "the actor's log; -v shows them]",
        ),
        (3, logging.WARNING, "image warm-up failed: x"),
    ]
    assert recorder.news() == []
