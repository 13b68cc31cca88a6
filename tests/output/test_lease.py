"""``_lease.json``: one driver per output; a live holder refuses others, a dead one's is taken."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from qvl_batch.errors import Exit, LeaseHeld, exit_for
from qvl_batch.output import lease as lease_mod
from qvl_batch.output.lease import LEASE_FILE, Lease, LeaseLost, read_lease, why_dead
from qvl_batch.output.state import OutputState


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.01)


def _other(path, *, pid: int, age_s: float = 0.0, host: str | None = None) -> dict:
    """Another driver's lease, written as its heartbeat would."""
    beat = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)
    record = {
        "job_id": "other-job",
        "host": host or socket.gethostname(),
        "pid": pid,
        "token": "0" * 32,
        "started_at": beat.isoformat(),
        "heartbeat_at": beat.isoformat(),
    }
    path.mkdir(exist_ok=True)
    (path / LEASE_FILE).write_text(json.dumps(record))
    return record


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lease_is_taken_beats_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    state = OutputState(str(tmp_path))
    lease = Lease.acquire(state, "job-1")
    first = read_lease(state)
    assert first["job_id"] == "job-1" and first["pid"] == os.getpid()
    assert first["host"] == socket.gethostname() and len(first["token"]) == 32
    time.sleep(0.3)
    assert read_lease(state)["heartbeat_at"] > first["heartbeat_at"]
    lease.check()
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_live_drivers_lease_refuses_a_second_one_naming_it(tmp_path):
    _other(tmp_path, pid=os.getpid(), age_s=3)
    with pytest.raises(LeaseHeld) as err:
        Lease.acquire(OutputState(str(tmp_path)), "job-2")
    text = str(err.value)
    assert "other-job" in text and f"{socket.gethostname()}:{os.getpid()}" in text
    assert "heartbeat 3 s ago" in text
    assert exit_for(err.value) == Exit.REFUSED
    assert read_lease(OutputState(str(tmp_path)))["job_id"] == "other-job"  # left alone


def test_a_live_lease_on_another_host_refuses_too(tmp_path):
    _other(tmp_path, pid=_dead_pid(), host="some-other-host")  # its pid means nothing here
    with pytest.raises(LeaseHeld, match="some-other-host"):
        Lease.acquire(OutputState(str(tmp_path)), "job-2")


@pytest.mark.parametrize("how", ["stale heartbeat", "dead pid"])
def test_a_dead_drivers_lease_is_taken_over_with_a_warning(tmp_path, caplog, how):
    if how == "stale heartbeat":  # another host: only the heartbeat's age tells
        other = _other(tmp_path, pid=1, age_s=lease_mod.STALE_S + 5, host="gone-host")
    else:  # this host, a fresh heartbeat, but the process is gone (SIGKILLed driver)
        other = _other(tmp_path, pid=_dead_pid())
    assert why_dead(other) is not None
    state = OutputState(str(tmp_path))
    with caplog.at_level("WARNING", logger="qvl_batch"):
        lease = Lease.acquire(state, "job-3")
    assert any("taking over the lease of job other-job" in r.message for r in caplog.records)
    assert read_lease(state)["job_id"] == "job-3"
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_lease_taken_over_stops_commits_and_is_not_removed(tmp_path, monkeypatch):
    """Two drivers both past the read-back (the race the wait narrows): the heartbeat finds the
    other token, and this run commits nothing more."""
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    state = OutputState(str(tmp_path))
    lease = Lease.acquire(state, "job-4")
    _other(tmp_path, pid=os.getpid())
    deadline = time.monotonic() + 10
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match="another driver took over"):
        lease.check()
    lease.release()
    assert read_lease(state)["job_id"] == "other-job"  # the new holder's lease stays


def test_the_lease_on_an_object_store(tmp_path):
    """No rename, no create-if-absent: write, wait, read back; a second driver is refused."""
    from qvl_batch.config import StorageConfig
    from qvl_batch.storage import Storage
    from qvl_batch.tooling.s3local import MotoServer

    with MotoServer(tmp_path / "moto.log") as server:
        storage = Storage(StorageConfig(endpoint_url=server.endpoint))
        fs, _ = storage.fs("s3://leases/out")
        fs.mkdir("leases")
        state = OutputState("s3://leases/out", storage)
        lease = Lease.acquire(state, "job-s3")
        assert read_lease(state)["job_id"] == "job-s3"
        with pytest.raises(LeaseHeld, match="job-s3"):
            Lease.acquire(OutputState("s3://leases/out", storage), "job-other")
        lease.release()
        assert read_lease(state) is None
