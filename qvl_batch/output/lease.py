"""One driver per output: ``<output>/_lease.json``, taken before a run touches the ledger and
kept fresh by a heartbeat thread until the run ends.

Two drivers committing into one output would both do all the work, and one's clean-up of
"orphan" part files would delete the other's commits in progress. The lease names its holder
(job id, host, pid, a random token) and when it last beat, so a second driver refuses (exit 3)
and ``status`` can tell a running job from a dead one. A lease whose heartbeat is older than
:data:`STALE_S`, or whose pid is gone on this host, belongs to a dead driver and is taken over.

Object stores have no create-if-absent in general, so taking it is write, wait, read back: the
driver goes on only if its own token is still there. That narrows the race to two drivers whose
writes land more than :data:`SETTLE_S` apart yet both after the other's read; the heartbeat,
which reads before it writes, catches what is left: a driver that finds another token there has
lost the lease, and its run stops at its next commit (:meth:`Lease.check`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import LeaseHeld
from ..storage import StorageError
from .state import LEASE_FILE, OutputState

log = logging.getLogger("qvl_batch")

# Refresh period: one small PUT every 10 s costs nothing, even on object stores, and lets
# `status` say "heartbeat Ns ago" with a useful resolution.
HEARTBEAT_S = 10.0
# Without a refresh for this long the holder is taken as dead: six missed beats, more than one
# write's worst storage retry chain (storage.max_attempts x max_backoff_s ~ 50 s by default)
# and any pause of a busy driver; a reader's and a writer's clocks may disagree by a few seconds.
STALE_S = 60.0
# Wait between writing the lease and reading it back: far longer than a competing driver's
# read-then-write (one GET and one PUT: tens of ms on object stores, less on a local disk),
# short enough not to be felt at the start of a run.
SETTLE_S = 1.0


class LeaseLost(RuntimeError):
    """Another driver took this output's lease over: this run must commit nothing more."""


def read_lease(state: OutputState) -> dict | None:
    """The output's ``_lease.json``, or None (absent, or not a lease)."""
    try:
        blob = state.read_path(state.path(LEASE_FILE))
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(blob)
    except ValueError:
        return None
    return lease if isinstance(lease, dict) and lease.get("token") else None


def heartbeat_age(lease: dict, now: float | None = None) -> float:
    """Seconds since the lease's last heartbeat (infinite when it has none that parses)."""
    try:
        beat = dt.datetime.fromisoformat(str(lease["heartbeat_at"])).timestamp()
    except (KeyError, ValueError):
        return float("inf")
    return max((time.time() if now is None else now) - beat, 0.0)


def _pid_gone(pid: int) -> bool:
    """True when no process ``pid`` runs here (a zombie counts as gone: it only awaits reaping)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def why_dead(lease: dict, now: float | None = None) -> str | None:
    """Why the lease's holder is taken as dead, or None while it is alive."""
    age = heartbeat_age(lease, now)
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_S:g} s)"
    pid = lease.get("pid")
    if lease.get("host") == socket.gethostname() and isinstance(pid, int) and _pid_gone(pid):
        return f"its process {pid} is gone"
    return None


def holder(lease: dict, now: float | None = None) -> str:
    """``job J (driver host:pid, heartbeat 3 s ago)``: who holds the lease, in words."""
    age = heartbeat_age(lease, now)
    return (
        f"job {lease.get('job_id')} (driver {lease.get('host')}:{lease.get('pid')}, "
        f"heartbeat {age:.0f} s ago)"
    )


class Lease:
    """This driver's lease on an output: :meth:`acquire` it, :meth:`check` it before each
    commit, :meth:`release` it when the run ends (however it ends)."""

    def __init__(self, state: OutputState, job_id: str):
        self.state, self.job_id = state, job_id
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        self.record = {
            "job_id": job_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "started_at": now,
            "heartbeat_at": now,
        }
        self.lost: str | None = None  # why the lease is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, state: OutputState, job_id: str) -> Lease:
        """Take the output's lease (raises LeaseHeld while another live driver holds it) and
        start its heartbeat."""
        lease = cls(state, job_id)
        found = read_lease(state)
        if found is not None:
            dead = why_dead(found)
            if dead is None:
                raise LeaseHeld(_refusal(state, found))
            log.warning("taking over the lease of %s: %s", holder(found), dead)
        lease._write()
        time.sleep(SETTLE_S)
        now = read_lease(state)
        if now is None or now.get("token") != lease.record["token"]:
            raise LeaseHeld(_refusal(state, now) if now else f"{state.url}: lease lost at start")
        lease._thread = threading.Thread(target=lease._beat_loop, name="qvl-lease", daemon=True)
        lease._thread.start()
        return lease

    def name_job(self, job_id: str) -> None:
        """The run's id, known once the ledger is read: written at once, not at the next beat
        (``status`` and a refused driver name the job from the lease)."""
        self.record["job_id"] = self.job_id = job_id
        try:
            self._write()
        except (OSError, StorageError) as exc:  # a transient outage: the next beat says it
            log.warning("lease not written: %s", exc)

    def _write(self) -> None:
        self.record["heartbeat_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self.state.write_json(LEASE_FILE, self.record)

    def _ours(self) -> bool:
        """Whether ``_lease.json`` still holds this driver's token (else :attr:`lost` says why)."""
        found = read_lease(self.state)
        if found is not None and found.get("token") == self.record["token"]:
            return True
        if self.lost is None:
            self.lost = (
                f"another driver took over the lease of {self.state.url}: {holder(found)}"
                if found
                else f"{self.state.url}/{LEASE_FILE} was removed by someone else"
            )
            log.error("%s; this run commits nothing more", self.lost)
        return False

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._ours():
                    return
                self._write()
            except (OSError, StorageError) as exc:  # a transient outage: try at the next beat
                log.warning("lease heartbeat not written: %s", exc)

    def check(self) -> None:
        """Raises LeaseLost once another driver holds the lease (found by the heartbeat)."""
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def release(self) -> int:
        """Stop the heartbeat and remove ``_lease.json`` if it is still ours; never raises.
        Returns the storage retries this took: they come after the run counted its own."""
        before = self.state.storage.stats.snapshot()["retries"]
        self._release()
        return self.state.storage.stats.snapshot()["retries"] - before

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        try:
            if self.lost is None and self._ours():
                self.state.remove([self.state.path(LEASE_FILE)])
        except (OSError, StorageError) as exc:
            log.warning("lease not removed (%s); it goes stale in %g s", exc, STALE_S)


def _refusal(state: OutputState, found: dict) -> str:
    return (
        f"output {state.url} is in use by {holder(found)}; wait for it to end, or stop it "
        f"(its lease goes stale {STALE_S:g} s after its last heartbeat)"
    )
