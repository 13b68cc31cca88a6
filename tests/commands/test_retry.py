"""retry-failed: error rows whose cause is fixed become data rows, each id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qvl_batch.commands.retry import RetryPass
from qvl_batch.commands.verify import verify_output
from qvl_batch.config import ConfigError
from qvl_batch.errors import Exit
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import check_fake_output, input_rows, read_output, write_job

SMALL = 200 * 200  # image.max_image_pixels of the first run: larger sources are refused


def _markers(out):
    # Markers only: a marker being written is a hidden temporary file until it is renamed.
    markers = sorted((out / "_state" / "units").glob("[!.]*.json"))
    return {p.stem: json.loads(p.read_text()) for p in markers}


def _retry(out, *overrides, codes=()):
    return RetryPass(str(out), list(overrides), list(codes), progress_bar=False).run()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retry_failed_turns_fixed_errors_into_data_exactly_once(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    inputs = input_rows(dataset)
    good = sorted(r["id"] for r in inputs if r["kind"] != "corrupt")
    small = sorted(
        r["id"] for r in inputs if r["kind"] != "corrupt" and r["width"] * r["height"] < SMALL / 2
    )
    flaky = small[:3]  # the engine fails these on the first run
    job = write_job(
        tmp_path / "j.yaml",
        dataset,
        out,
        ray_head,
        image__max_image_pixels=SMALL,
        engine__fake__fail_ids=flaky,
        limits__max_error_fraction=0.95,
    )
    first = run_job(load_job(job), progress_bar=False)
    assert first.exit_code == Exit.OK, first.lines()
    _, errors = read_output(out)
    big = {r["id"] for r in errors if r["error_code"] == "IMAGE_TOO_LARGE"}
    assert len(big) > 10 and not big & set(flaky)
    assert first.error_codes["ENGINE_ERROR"] == len(flaky)

    # Pass 1: only IMAGE_TOO_LARGE, with the limit raised; the other errors stay as they are.
    one = _retry(out, "image.max_image_pixels=100000000", codes=["IMAGE_TOO_LARGE"])
    assert one.exit_code == Exit.OK, one.lines()
    # truncated JPEGs whose header promises a large image now fail further on: DECODE_ERROR
    corrupt = {r["id"] for r in inputs if r["kind"] == "corrupt"}
    assert one.rows_this_run == len(big) and one.errors_this_run == len(big & corrupt)
    data, errors = read_output(out)
    assert {r["id"] for r in data} >= big - corrupt
    assert {r["id"]: r["error_code"] for r in errors if r["id"] in flaky} == dict.fromkeys(
        flaky, "ENGINE_ERROR"
    )
    assert (out / "_SUCCESS").exists()
    report = verify_output(str(out))
    assert report.ok, report.violations
    assert "IMAGE_TOO_LARGE" not in report.error_codes
    # the rows made by the pass carry its lineage, and the markers list the pass
    fixed = [r for r in data if r["id"] in big]
    assert len(fixed) == len(big - corrupt)
    assert {r["job_id"] for r in fixed} == {one.job_id} != {first.job_id}
    assert any(m.get("retries") for m in _markers(out).values())

    # Pass 2, every code, the engine fault gone: SIGKILLed mid-pass, then run again.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "qvl_batch.cli", "retry-failed", str(out)]
    # Each pass starts from the job's saved config: the raised limit is given again.
    fixes = ["engine.fake.fail_ids=[]", "image.max_image_pixels=100000000"]
    cmd += [*fixes, "engine.fake.batch_latency_s=0.4", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while sum(len(m.get("retries") or []) >= 2 for m in _markers(out).values()) < 1:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the pass never committed a unit"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_SUCCESS").exists()  # an output being changed says so
    two = _retry(out, *fixes)
    assert two.exit_code == Exit.OK, two.lines()
    # Now it equals a clean run: texts right, only the corrupt inputs in errors/, once each.
    data, errors = check_fake_output(dataset, out)
    assert sorted(r["id"] for r in data) == good
    assert {r["attempts"] for r in errors} >= {2}  # corrupt rows ran again and failed again
    report = verify_output(str(out))
    assert report.ok, report.violations
    assert report.data_rows == len(good)

    nothing = _retry(out, codes=["ENGINE_ERROR"])
    assert nothing.status == "nothing_to_retry" and nothing.exit_code == Exit.OK


def test_retry_refuses_other_input_and_unfinished_jobs(tmp_path, dataset):
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_job(write_job(tmp_path / "j.yaml", dataset, out, None))
    from qvl_batch.run.driver import Driver

    Driver(cfg).prepare()  # _job.json written, no unit committed
    with pytest.raises(ConfigError, match="not committed yet"):
        RetryPass(str(out), [], []).prepare()
    with pytest.raises(ConfigError, match="the job's input changed"):
        RetryPass(str(out), [f"input.paths=[{dataset}/part-00000.parquet]"], []).prepare()
