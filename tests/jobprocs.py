"""Finding one job's processes on a shared machine: its actors carry ``QVL_JOB_ID`` (the
``runtime_env`` the ActorPool gives them), so a test kills only what its own job started."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def job_id_of(output: Path, timeout: float = 60.0) -> str:
    """The job id from ``_job.json`` (written before any actor starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads((output / "_job.json").read_text())["job_id"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise AssertionError(f"no _job.json in {output} after {timeout}s")


def job_actors(job_id: str) -> list[tuple[int, str]]:
    """(pid, phase) of every live process of this job's actors. Phases, from the title Ray
    gives the process: "booting" (the worker is still starting Python), "loading" (its
    creation task, the engine's constructor, is running) or "working" (ready)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get("QVL_JOB_ID") != job_id or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, OSError):
            continue
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::UnitWorker.__init__"):
            phase = "loading"
        elif title.startswith("ray::UnitWorker"):
            phase = "working"
        else:
            phase = "booting"
        found.append((p.pid, phase))
    return found


def start_driver(job: Path) -> subprocess.Popen:
    """``qvl-batch run JOB`` in its own process group, output captured."""
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
