"""``qvl-batch submit`` / ``qvl-batch jobs`` against a real Ray head with its Jobs API (dashboard).

One head for the module, on loopback, with a dashboard and two CPUs. Jobs use the fake engine
with a latency per batch so one can be cancelled mid-run; outputs are checked row by row and
with ``qvl-batch verify``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from qvl_batch.commands.status import job_status
from qvl_batch.commands.submit import Submission, connect, live_actors, plan_submission, submit
from qvl_batch.errors import Exit
from qvl_batch.output.state import NotAJobOutput

from ..conftest import REPO, check_fake_output, write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra: str) -> dict[str, str]:
    """The environment of the CLI and the head: token auth off (a private throwaway cluster),
    no RAY_ADDRESS from outside, and this venv's ``python`` first on PATH, as on a cluster
    whose image has qvl-batch's dependencies."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def jobs_api():
    """A Ray head with the Jobs API; yields its dashboard URL.

    Stopped with SIGINT to ``ray start --block`` (it shuts its processes down; SIGTERM it
    ignores), then SIGKILL to its group and to any process left that names its temp dir.
    Never ``ray stop``: that would stop every Ray cluster on the machine.
    """
    temp = tempfile.mkdtemp(prefix="qvs", dir="/tmp")  # short: Unix socket paths are limited
    gcs, dash, *more = _free_ports(8)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={more[0]}",
        f"--dashboard-agent-grpc-port={more[1]}",
        f"--runtime-env-agent-port={more[2]}",
        f"--metrics-export-port={more[3]}",
        f"--ray-client-server-port={more[4]}",
        f"--node-manager-port={more[5]}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log_path = Path(temp) / "head.log"
    log = open(log_path, "wb")  # noqa: SIM115 - held for the module
    head = subprocess.Popen(
        cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, log_path.read_text()
            try:
                if requests.get(f"{url}/api/jobs/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the dashboard did not answer in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        log.close()
        for proc in psutil.process_iter(["cmdline"]):  # workers, agents: anything of ours
            try:
                if any(temp in arg for arg in proc.info["cmdline"] or ()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(temp, ignore_errors=True)


def cli(*args, env: dict | None = None, timeout: float = 200) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qvl_batch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or _env(),
    )
    return proc.returncode, proc.stdout, proc.stderr


PROBE = """
import json, ray, qvl_batch, qvl_batch.config as c
ray.init(address="auto")
where = ray.remote(num_cpus=0)(lambda: __import__("qvl_batch").__file__)
print(json.dumps([qvl_batch.__file__, str(c.conf_dir()), ray.get(where.remote())]))
"""


def submission_id(stdout: str) -> str:
    match = re.search(r"^submitted (\S+) to ", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def markers(output: Path) -> dict[str, str]:
    """unit id -> committed_at of every commit marker."""
    found = {}
    for path in (output / "_state" / "units").glob("*.json"):
        record = json.loads(path.read_text())
        found[record["unit_id"]] = record["committed_at"]
    return found


def job_file(tmp_path: Path, dataset: Path, output: Path, **extra) -> Path:
    """The job file in a folder of its own: that folder is what travels as the working dir."""
    folder = tmp_path / "job"
    folder.mkdir(exist_ok=True)
    return write_job(folder / "job.yaml", dataset, output, None, **extra)


def test_submitted_job_succeeds_and_reports(tmp_path, dataset, jobs_api):
    out = tmp_path / "out"
    job = job_file(tmp_path, dataset, out, engine__fake__batch_latency_s=0.05)
    code, stdout, stderr = cli("submit", job, "--address", jobs_api, "--wait")
    assert code == Exit.OK, stdout + stderr
    sid = submission_id(stdout)
    assert re.search(r"^job test-\S+: SUCCEEDED", stdout, re.MULTILINE), stdout  # the summary
    assert f"qvl-batch jobs status {sid} --address {jobs_api}" in stdout
    assert f"job {sid}: SUCCEEDED" in stderr

    code, status, err = cli("jobs", "status", sid, "--address", jobs_api)
    assert code == Exit.OK, err
    assert f"submission {sid}: SUCCEEDED  (job test)" in status
    assert f"output: {out}" in status
    assert "ledger: job test-" in status and ": complete" in status, status
    assert "rows: 240 / 240 done" in status, status

    code, logs, err = cli("jobs", "logs", sid, "--address", jobs_api)
    assert code == Exit.OK, err
    assert re.search(r"^job test-\S+: SUCCEEDED", logs, re.MULTILINE), logs
    assert "this run: 240 rows" in logs, logs

    code, listing, err = cli("jobs", "list", "--address", jobs_api)
    assert code == Exit.OK, err
    assert re.search(rf"^{re.escape(sid)}\s+SUCCEEDED\s+test\s", listing, re.MULTILINE), listing

    code, report, err = cli("verify", out)
    assert code == Exit.OK, report + err
    check_fake_output(dataset, out)

    # The driver and its workers ran the shipped package (conf/ inside it), not the repo's:
    # a probe with the same runtime env as the job's submission.
    client = connect(jobs_api)
    assert client.get_job_info(sid).runtime_env["py_modules"][0].startswith("gcs://")
    (job.parent / "probe.py").write_text(PROBE)
    plan = plan_submission(job, [], submission_id=f"probe-{sid}")
    probe_id = submit(
        client, Submission(plan.submission_id, "python probe.py", plan.runtime_env, {})
    )
    deadline = time.monotonic() + 120
    while not client.get_job_status(probe_id).is_terminal():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    logs = client.get_job_logs(probe_id)
    assert str(client.get_job_status(probe_id)) == "SUCCEEDED", logs
    driver, conf, worker = json.loads(logs.strip().splitlines()[-1])
    for module in (driver, worker):
        assert "runtime_resources" in module and not module.startswith(str(REPO)), module
    assert Path(conf) == Path(driver).parent / "conf" and (Path(conf) / "engine").is_dir()


def test_cancel_keeps_committed_units_and_resubmit_resumes(tmp_path, dataset, jobs_api):
    out = tmp_path / "out"
    # One unit in flight per actor and 0.1 s per row: 9 units of about 32 rows commit one by
    # one over about 15 s, so the job is cancelled with some committed and most not.
    job = job_file(
        tmp_path,
        dataset,
        out,
        engine__fake__row_latency_s=0.1,
        batching__units_in_flight_per_actor=1,
    )
    code, stdout, stderr = cli("submit", job, "--address", jobs_api)
    assert code == Exit.OK, stdout + stderr
    sid = submission_id(stdout)

    deadline = time.monotonic() + 150
    while True:
        try:
            done = job_status(str(out)).units_committed
        except NotAJobOutput:
            done = 0
        if done >= 2:
            break
        assert time.monotonic() < deadline, cli("jobs", "logs", sid, "--address", jobs_api)[1]
        time.sleep(0.2)

    # The driver joined this cluster (no private Ray): its actors are the cluster's.
    client = connect(jobs_api)
    ray_job_id = client.get_job_info(sid).job_id
    running = live_actors(client, ray_job_id)
    assert sorted(a["class_name"] for a in running) == ["FlightRecorder", *["UnitWorker"] * 2]

    code, text, err = cli("jobs", "cancel", sid, "--address", jobs_api)
    assert code == Exit.OK, text + err
    assert f"job {sid}: STOPPED" in text and "actors: all gone" in text, text
    assert str(client.get_job_status(sid)) == "STOPPED"
    assert live_actors(client, ray_job_id) == []  # they went with their driver

    before = markers(out)
    time.sleep(1.5)
    assert markers(out) == before, "nothing commits after the stop"
    assert len(before) >= 2
    assert not (out / "_SUCCESS").exists(), "cancelled before the end"
    code, status, _ = cli("jobs", "status", sid, "--address", jobs_api)
    assert f"submission {sid}: STOPPED" in status
    assert f"{len(before)} units committed" in status, status

    # The same job again: it resumes and runs only the units that were not committed.
    code, stdout, stderr = cli("submit", job, "--address", jobs_api, "--wait")
    assert code == Exit.OK, stdout + stderr
    after = markers(out)
    assert {u: after[u] for u in before} == before, "committed units are not redone"
    match = re.search(r"this run: \d+ rows in (\d+) units", stdout)
    assert match and int(match.group(1)) == len(after) - len(before) > 0, stdout
    code, report, err = cli("verify", out)
    assert code == Exit.OK, report + err
    check_fake_output(dataset, out)


def test_bad_config_and_unreachable_address_exit_2(tmp_path, dataset, jobs_api):
    client = connect(jobs_api)
    jobs_before = len(client.list_jobs())
    job = job_file(tmp_path, dataset, tmp_path / "out")

    code, stdout, stderr = cli("submit", job, "batching.max_batch_sise=4", "--address", jobs_api)
    assert code == Exit.CONFIG, stdout + stderr
    assert "max_batch_sise" in stderr and "submitted" not in stdout
    code, _, stderr = cli("submit", job, "output.path=relative/out", "--address", jobs_api)
    assert code == Exit.CONFIG and "output.path 'relative/out' is relative" in stderr
    assert len(client.list_jobs()) == jobs_before, "nothing reached the cluster"

    (dead,) = _free_ports(1)
    code, _, stderr = cli("submit", job, "--address", f"http://127.0.0.1:{dead}", timeout=60)
    assert code == Exit.CONFIG and "cannot reach the Ray Jobs API" in stderr, stderr
    assert "check:" in stderr
    code, _, stderr = cli("jobs", "status", "x", "--address", f"http://127.0.0.1:{dead}")
    assert code == Exit.CONFIG and "cannot reach" in stderr, stderr
    code, _, stderr = cli("submit", job)
    assert code == Exit.CONFIG and "no cluster address" in stderr, stderr
    code, _, stderr = cli("jobs", "status", "no-such-job", "--address", jobs_api)
    assert code == Exit.CONFIG and "no such job" in stderr, stderr

    # A job that fails on the cluster (its input matches nothing there): --wait exits with the
    # driver's code, and `jobs status` shows it.
    missing = f"input.paths=[{tmp_path}/nowhere/*.parquet]"
    code, stdout, stderr = cli("submit", job, missing, "--address", jobs_api, "--wait")
    assert code == Exit.CONFIG, stdout + stderr
    sid = submission_id(stdout)
    assert f"job {sid}: FAILED" in stderr
    code, status, _ = cli("jobs", "status", sid, "--address", jobs_api)
    assert f"submission {sid}: FAILED" in status and "driver exit code: 2" in status, status
    assert "ledger: nothing committed yet" in status, status

    # RAY_ADDRESS is the address when --address is absent.
    code, listing, stderr = cli("jobs", "list", env=_env(RAY_ADDRESS=jobs_api))
    assert code == Exit.OK and listing.startswith("SUBMISSION ID"), listing + stderr
