"""Chaos: SIGKILL random actors and the driver at random moments, resume each time; in the end
``verify`` passes and the output equals an uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from qvl_batch.config import load_config
from qvl_batch.driver import EXIT_OK, run_job
from qvl_batch.synth import SynthSpec, make_dataset
from qvl_batch.verify import verify_output

from .conftest import DATA_KEYS, ERROR_KEYS, comparable, read_output, write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 12
ACTOR_TITLE = "ray::UnitWorker"


def _actor_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(ACTOR_TITLE):
            pids.append(p.pid)
    return pids


def _start(job):
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_random_kills_of_actors_and_driver_lose_and_duplicate_nothing(tmp_path, ray_head):
    data = tmp_path / "data"
    spec = SynthSpec(rows=480, shards=4, row_group_rows=16, max_side=160, corrupt_fraction=0.03)
    make_dataset(str(data), spec)
    common = {
        "batching__unit_rows": 16,  # 30 units: many commits for kills to land between
        # A random kill can land on a row that runs alone after an earlier kill; four such
        # deaths before a healthy row is condemned makes that practically impossible here.
        "limits__max_row_crashes": 4,
        "limits__max_actor_restarts": 100,
    }
    ref_job = write_job(tmp_path / "ref.yaml", data, tmp_path / "ref", ray_head, **common)
    assert run_job(load_config(ref_job), progress_bar=False).exit_code == EXIT_OK

    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data,
        out,
        ray_head,
        # Slow enough that the job outlives 12 kills 1-4 s apart (batches run full).
        engine__fake={"batch_latency_s": 0.5},
        **common,
    )
    rng = random.Random(20261125)
    kills = {"driver": 0, "actor": 0}
    proc = _start(job)
    while sum(kills.values()) < KILLS:
        deadline = time.monotonic() + rng.uniform(1.0, 4.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the chaos did: slow it down"
        actors = _actor_pids()
        if actors and rng.random() < 0.6:
            os.kill(rng.choice(actors), signal.SIGKILL)
            kills["actor"] += 1
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            kills["driver"] += 1
            proc = _start(job)
    log = proc.communicate(timeout=600)[0].decode()
    if proc.returncode != EXIT_OK:  # a kill may have landed as the last driver finished
        proc = _start(job)
        log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == EXIT_OK, log
    assert kills["driver"] >= 3 and kills["actor"] >= 3, kills

    report = verify_output(str(out))
    assert report.ok, report.lines()
    data_rows, error_rows = read_output(out)
    ref_data, ref_errors = read_output(tmp_path / "ref")
    assert comparable(data_rows, DATA_KEYS) == comparable(ref_data, DATA_KEYS)
    assert comparable(error_rows, ERROR_KEYS) == comparable(ref_errors, ERROR_KEYS)
