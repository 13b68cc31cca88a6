"""Chaos: SIGKILL this job's actors (while loading and while working) and its driver (also
while units are being committed) at random moments, resume each time; in the end ``verify``
passes and the output equals an uninterrupted run's. Only this job's processes are killed: its
actors are found by the job id they carry, never by a process title other jobs share."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from qvl_batch.config import load_config
from qvl_batch.driver import EXIT_OK, run_job
from qvl_batch.synth import SynthSpec, make_dataset
from qvl_batch.verify import verify_output

from .conftest import DATA_KEYS, ERROR_KEYS, comparable, read_output, write_job
from .jobprocs import job_actors, job_id_of, start_driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 12
LOAD_S = 1.5  # the fake engine's "model load": the window for start-up kills
PHASES = ("startup", "actor", "driver", "commit")


def _uncommitted_part(out) -> bool:
    """A unit's part file is written but its marker is not yet: a commit in progress."""
    markers = {p.stem for p in (out / "_state" / "units").glob("*.json")}
    return any(
        p.name.startswith("part-") and p.stem[len("part-") :] not in markers
        for sub in ("data", "errors")
        for p in (out / sub).glob("part-*.parquet")
    )


class Chaos:
    def __init__(self, job, out, rng: random.Random):
        self.job, self.out, self.rng = job, out, rng
        self.kills = dict.fromkeys(PHASES, 0)
        self.proc = start_driver(job)
        self.job_id = job_id_of(out)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_actor(self, phase: str) -> bool:
        """Kill one of this job's actors in ``phase``: "loading" (its engine's constructor is
        running: start-up) or "working"."""
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and self.alive():
            pids = [p for p, ph in job_actors(self.job_id) if ph == phase]
            if pids:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.kills["startup" if phase == "loading" else "actor"] += 1
                return True
            time.sleep(0.02)
        return False

    def kill_driver(self, in_commit: bool) -> None:
        phase = "driver"
        if in_commit:  # wait for a commit in progress (best effort; else a plain driver kill)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.alive():
                if _uncommitted_part(self.out):
                    phase = "commit"
                    break
                time.sleep(0.003)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills[phase] += 1
        self.proc = start_driver(self.job)

    def step(self) -> None:
        deadline = time.monotonic() + self.rng.uniform(0.5, 2.5)
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        assert self.alive(), "the job finished before the chaos did: slow it down\n" + self.log()
        phase = self.rng.choice(PHASES)
        if phase == "startup":
            # A loading actor: a fresh driver's, or the replacement of a working one killed now.
            if not self.kill_actor("loading") and self.kill_actor("working"):
                self.kill_actor("loading")
        elif phase == "actor":
            self.kill_actor("working")
        else:
            self.kill_driver(in_commit=phase == "commit")

    def log(self) -> str:
        if self.alive():
            return "(driver still running)"
        return self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""


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
    # Slow enough that the job outlives 12 kills (batches run full); each actor takes LOAD_S
    # to load, so there is a start-up window to kill it in.
    fake = {"batch_latency_s": 0.5, "load_s": LOAD_S}
    job = write_job(tmp_path / "job.yaml", data, out, ray_head, engine__fake=fake, **common)
    chaos = Chaos(job, out, random.Random(20261125))
    while sum(chaos.kills.values()) < KILLS:
        chaos.step()
    log = chaos.proc.communicate(timeout=600)[0].decode(errors="replace")
    if chaos.proc.returncode != EXIT_OK:  # a kill may have landed as the last driver finished
        chaos.proc = start_driver(job)
        log = chaos.proc.communicate(timeout=600)[0].decode(errors="replace")
    assert chaos.proc.returncode == EXIT_OK, log
    kills = chaos.kills
    print("kills by phase:", kills)
    assert kills["startup"] >= 1 and kills["actor"] >= 2, (kills, log)
    assert kills["driver"] + kills["commit"] >= 3, (kills, log)

    report = verify_output(str(out))
    assert report.ok, report.lines()
    data_rows, error_rows = read_output(out)
    ref_data, ref_errors = read_output(tmp_path / "ref")
    assert comparable(data_rows, DATA_KEYS) == comparable(ref_data, DATA_KEYS)
    assert comparable(error_rows, ERROR_KEYS) == comparable(ref_errors, ERROR_KEYS)
