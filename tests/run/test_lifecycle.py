"""An output's lifecycle: one driver at a time (the lease), SIGTERM as Ctrl-C, status live or
dead, retry-failed closing the output with its own outcome, commands run from anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qvl_batch.commands.retry import RetryPass
from qvl_batch.commands.status import job_status
from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit
from qvl_batch.output.lease import LEASE_FILE
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import input_rows, write_job
from ..jobprocs import start_driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _wait_for_commit(out, proc, log, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "_state" / "units").glob("[!.]*.json")):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no unit committed"
        time.sleep(0.1)


def test_second_driver_refused_sigterm_clean_then_resume(tmp_path, dataset, ray_head):
    out, log = tmp_path / "out", tmp_path / "driver.log"
    # ~0.1 s a row: 6 units of 40 rows over 2 actors take ~12 s, time to try a second driver.
    job = write_job(tmp_path / "j.yaml", dataset, out, ray_head, engine__fake__row_latency_s=0.1)
    first = start_driver(job, log)
    try:
        _wait_for_commit(out, first, log)
        lease = json.loads((out / LEASE_FILE).read_text())
        assert lease["pid"] == first.pid
        # named at once, not at the next heartbeat (10 s): a refusal reads this file too
        assert lease["job_id"] == json.loads((out / "_job.json").read_text())["job_id"]
        report = job_status(str(out))
        assert report.state == "running" and f":{first.pid}, heartbeat" in report.driver

        cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress"]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == Exit.REFUSED, second.stderr
        refusal = [ln for ln in second.stderr.splitlines() if "refused" in ln]
        assert len(refusal) == 1 and f":{first.pid}" in refusal[0], second.stderr
        assert lease["job_id"] in refusal[0] and "heartbeat" in refusal[0]

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == Exit.TERMINATED, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    text = log.read_text()
    assert "terminated (SIGTERM); committed units are kept" in text, text
    for trace in ("Aborted", "SIGABRT", "core dumped", "*** "):
        assert trace not in text, text
    assert not (out / LEASE_FILE).exists()
    assert not (out / "_SUCCESS").exists()
    assert job_status(str(out)).state == "interrupted"

    again = run_job(load_job(job), progress_bar=False)
    assert again.exit_code == Exit.OK, again.lines()
    assert 0 < again.rows_this_run < again.rows_total  # resumed, not redone
    report = verify_output(str(out))
    assert report.ok, report.violations
    assert report.data_rows + report.error_rows == len(input_rows(dataset))
    assert not (out / LEASE_FILE).exists()


def test_retry_failed_from_elsewhere_fixes_a_failed_job_and_says_so(
    tmp_path, dataset, ray_head, monkeypatch
):
    """A job run with relative paths fails (too many engine errors); retry-failed and verify,
    run from another directory, fix it and check it; _SUCCESS and the metrics tell the fix."""
    ids = sorted(r["id"] for r in input_rows(dataset) if r["kind"] != "corrupt")
    flaky = ids[::8]  # ~28 rows: with the corrupt ones, over the 0.15 limit
    monkeypatch.chdir(tmp_path)
    write_job(
        tmp_path / "j.yaml",
        dataset.relative_to(tmp_path),
        tmp_path.joinpath("out").relative_to(tmp_path),
        ray_head,
        engine__fake__fail_ids=flaky,
        limits__max_error_fraction=0.15,
    )
    first = run_job(load_job("j.yaml"), progress_bar=False)
    assert first.exit_code == Exit.FAILED and "error fraction" in first.message, first.lines()
    saved = json.loads((tmp_path / "out" / "_job.json").read_text())["config"]
    assert saved["input"]["paths"] == [f"{dataset}/*.parquet"]  # absolute, as typed relative
    assert not (tmp_path / "out" / LEASE_FILE).exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = str(tmp_path / "out")
    fixed = RetryPass(out, ["engine.fake.fail_ids=[]"], [], progress_bar=False).run()
    assert fixed.exit_code == Exit.OK and fixed.status == "succeeded", fixed.lines()
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    summary = json.loads((tmp_path / "out" / "_metrics.json").read_text())["summary"]
    for told in (success, summary):
        assert told["status"] == "succeeded" and told["exit_code"] == Exit.OK
        assert told["error_rows"] == fixed.error_rows < first.error_rows
        assert told["last_pass"] == fixed.job_id
    assert success["job_id"] == first.job_id
    assert job_status(out).state == "complete"
    report = verify_output(out)
    assert report.ok, report.violations
    assert not (tmp_path / "out" / LEASE_FILE).exists()
