"""End-to-end jobs on a real local Ray cluster: exactly-once outputs, resume, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit
from qvl_batch.output.state import ResumeRefused
from qvl_batch.rows.manifest import plan_job
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import (
    DATA_KEYS,
    ERROR_KEYS,
    comparable,
    expected_for,
    input_rows,
    read_output,
    write_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Describe this image."


def run(job_file, *overrides):
    return run_job(load_job(job_file, list(overrides)), progress_bar=False)


def assert_exactly_once(data_dir, output):
    data, errors = read_output(output)
    ids_in = sorted(r["id"] for r in input_rows(data_dir))
    ids_out = sorted([r["id"] for r in data] + [r["id"] for r in errors])
    assert ids_out == ids_in, "every input id exactly once across data/ and errors/"
    return data, errors


@pytest.fixture
def reference(tmp_path, dataset, ray_head):
    """An uninterrupted run of the standard job: what every interrupted run must equal."""
    job = write_job(tmp_path / "ref.yaml", dataset, tmp_path / "ref-out", ray_head)
    summary = run(job)
    assert summary.exit_code == Exit.OK, summary.lines()
    return read_output(tmp_path / "ref-out")


def test_job_outputs_exactly_once_and_match_fake_engine(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head)
    summary = run(job)
    assert summary.exit_code == Exit.OK, summary.lines()
    data, errors = assert_exactly_once(dataset, out)

    inputs = {r["id"]: r for r in input_rows(dataset)}
    corrupt = {i for i, r in inputs.items() if r["kind"] == "corrupt"}
    assert corrupt, "the fixture must contain corrupt images"
    assert {r["id"] for r in errors} == corrupt
    assert {r["error_code"] for r in errors} <= {"DECODE_ERROR", "MISSING_IMAGE"}
    assert all(r["error_message"] for r in errors)

    for row in data:
        src = inputs[row["id"]]
        text, finish = expected_for(src["image"], PROMPT)
        assert (row["text"], row["finish_reason"]) == (text, finish)
        assert row["source"] == src["source"]  # passthrough column
        assert row["resized_width"] % 28 == 0 and row["resized_height"] % 28 == 0
        assert row["vision_tokens"] == (row["resized_width"] // 28) * (row["resized_height"] // 28)
        assert (row["image_width"], row["image_height"]) == (src["width"], src["height"])
        assert row["engine"] == "fake" and row["job_id"] == summary.job_id

    assert (out / "_SUCCESS").exists()
    report = (out / "_report.html").read_text()
    assert summary.job_id in report and report.count('src="data:image/png;base64,') == 5
    job_meta = json.loads((out / "_job.json").read_text())
    assert job_meta["config"]["prompt"]["template"] == PROMPT
    assert len(job_meta["fingerprint"]) == 16
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["summary"]["rows_this_run"] == len(inputs)
    # The engine ran every data row once, plus rows of tail backup copies that lost the race.
    copies = metrics["summary"]["backup_copies"]  # units of at most unit_rows=40 rows
    assert len(data) <= metrics["padding"]["rows"] <= len(data) + copies * 40
    assert 30 < metrics["actor_peak_rss_mib"] < 4096  # an actor process's peak, in MiB
    assert "peak_rss_mib" not in metrics["actor_timings_s"]
    assert summary.data_rows == len(data) and summary.error_rows == len(errors)
    report = verify_output(str(out))
    assert report.ok and report.to_dict()["data_rows"] == len(data), report.lines()


def test_rerun_is_noop_and_changed_prompt_is_refused(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head)
    assert run(job).exit_code == Exit.OK
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = run(job)
    assert again.status == "already_complete" and again.rows_this_run == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before, "a finished job re-run must not touch its output"

    with pytest.raises(ResumeRefused, match=r"prompt\.template"):
        run(job, "prompt.template=Caption this.")
    fresh = run(job, "prompt.template=Caption this.", "output.mode=overwrite")
    assert fresh.exit_code == Exit.OK and fresh.rows_this_run == len(input_rows(dataset))
    data, _ = read_output(out)
    src = {r["id"]: r for r in input_rows(dataset)}
    assert all(r["text"] == expected_for(src[r["id"]]["image"], "Caption this.")[0] for r in data)


def _cli(job, *args):
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_sigkill_driver_then_resume_equals_uninterrupted(tmp_path, dataset, ray_head, reference):
    out = tmp_path / "out"
    # Slow the engine so the kill lands mid-job: 6 units of 40 rows at ~0.1 s per batch of 8.
    job = write_job(
        tmp_path / "job.yaml", dataset, out, ray_head, engine__fake={"batch_latency_s": 0.1}
    )
    proc = _cli(job)
    units = out / "_state" / "units"
    deadline = time.monotonic() + 120
    while not (units.exists() and len(list(units.glob("*.json"))) >= 2):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    committed = len(list(units.glob("*.json")))
    assert not (out / "_SUCCESS").exists()
    total_units = plan_job(load_job(job)).num_units()
    assert committed < total_units, "the kill should land before the job finished"

    proc = _cli(job)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == Exit.OK, log
    assert "SUCCEEDED" in log
    data, errors = assert_exactly_once(dataset, out)
    ref_data, ref_errors = reference
    assert comparable(data, DATA_KEYS) == comparable(ref_data, DATA_KEYS)
    assert comparable(errors, ERROR_KEYS) == comparable(ref_errors, ERROR_KEYS)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["summary"]["rows_this_run"] < len(input_rows(dataset)), "resumed, not redone"


def test_actor_killed_mid_batch_job_completes_exactly_once(tmp_path, dataset, ray_head, reference):
    out = tmp_path / "out"
    # The first actor started SIGKILLs itself inside generate() after 20 rows; its units go back
    # to the queue and a replacement actor (a later serial number) finishes them.
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"exit_after_rows": 20, "exit_incarnations": 1},
    )
    summary = run(job)
    assert summary.exit_code == Exit.OK, summary.lines()
    assert summary.actor_restarts >= 1 and summary.unit_retries >= 1
    data, errors = assert_exactly_once(dataset, out)
    ref_data, ref_errors = reference
    assert comparable(data, DATA_KEYS) == comparable(ref_data, DATA_KEYS)
    assert comparable(errors, ERROR_KEYS) == comparable(ref_errors, ERROR_KEYS)


def test_actors_that_always_die_fail_the_job_cleanly(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"exit_after_rows": 1, "exit_incarnations": 1000},
        limits__max_actor_restarts=3,
    )
    summary = run(job)
    assert summary.exit_code == Exit.FAILED
    assert "actors died 4 times, over limits.max_actor_restarts=3" in summary.message
    assert not (out / "_SUCCESS").exists()
    assert (out / "_metrics.json").exists()
