"""``qvl-batch status OUTPUT``: how far a job has got, read from its ledger alone.

Reads ``_job.json``, the commit markers, ``_lease.json``, ``_SUCCESS`` and ``_metrics.json``
(never part files or images), so it is cheap on a running job: rows done, errors by code, and
whether a driver is alive (its lease's heartbeat). Only a live job gets a rate and an ETA: a
dead one's last commits say nothing about when it will finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from dataclasses import dataclass, field

from ..config import StorageConfig
from ..errors import Exit
from ..output.lease import heartbeat_age, read_lease, why_dead
from ..output.state import NotAJobOutput
from ..report.totals import error_codes_line, totals_of
from ..storage import StorageError
from .existing_output import open_output

RATE_WINDOW_S = 300.0  # the rate is measured over the last 5 minutes of commits


@dataclass
class StatusReport:
    """Progress of one job as its ledger tells it."""

    output: str
    job_id: str = ""
    state: str = "interrupted"  # complete | running | stopped | failed | interrupted
    driver: str = ""  # running / stopped: who holds the lease and its heartbeat's age
    created_at: str = ""
    rows_total: int = 0
    rows_done: int = 0
    data_rows: int = 0
    error_rows: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    units_committed: int = 0
    last_commit_at: str | None = None
    rows_per_s: float | None = None  # None: too few commits to tell
    eta_s: float | None = None
    summary: dict = field(default_factory=dict)  # from _metrics.json once the job has ended

    @property
    def rows_pending(self) -> int:
        return max(self.rows_total - self.rows_done, 0)

    def lines(self) -> list[str]:
        pct = 100.0 * self.rows_done / self.rows_total if self.rows_total else 100.0
        rate = "?" if self.rows_per_s is None else f"{self.rows_per_s:,.1f} rows/s"
        eta = "?" if self.eta_s is None else str(dt.timedelta(seconds=round(self.eta_s)))
        out = [
            f"job {self.job_id}: {self.state_line()}  ({self.output}, created {self.created_at})",
            f"  rows: {self.rows_done:,} / {self.rows_total:,} done ({pct:.1f}%), "
            f"{self.rows_pending:,} pending; {self.units_committed:,} units committed",
            f"  output: {self.data_rows:,} data rows, {self.error_rows:,} error rows",
        ]
        if self.error_codes:
            out.append(error_codes_line(self.error_codes))
        if self.state == "running":
            out.append(
                f"  rate: {rate} (recent commits); ETA {eta}; last commit {self.last_commit_at}"
            )
        elif self.state != "complete":
            out.append(f"  last commit {self.last_commit_at}")
        if self.summary:
            keys = ("status", "elapsed_s", "rows_per_s", "rows_this_run", "message")
            out.append("  summary: " + ", ".join(f"{k}={self.summary.get(k)}" for k in keys))
        return out

    def state_line(self) -> str:
        """The state in words: running (whose driver), or why not."""
        if self.state == "running":
            return f"running ({self.driver})"
        if self.state == "stopped":
            return f"not running: the driver stopped ({self.driver}); run again to resume"
        if self.state == "interrupted":
            return "not running: interrupted (no driver holds the output); run again to resume"
        return self.state

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rows_pending": self.rows_pending}


def commit_rate(commits: list[tuple[dt.datetime, int]]) -> float | None:
    """Rows per second over the last RATE_WINDOW_S of commits (or their whole span if shorter).

    ``commits`` are (committed_at, num_rows); the first commit of the window opens it, so its
    rows are not counted. None with fewer than two distinct times.
    """
    if len(commits) < 2:
        return None
    commits = sorted(commits)
    last = commits[-1][0]
    window = [c for c in commits if (last - c[0]).total_seconds() <= RATE_WINDOW_S]
    span = (last - window[0][0]).total_seconds()
    if span <= 0:
        return None
    return sum(n for _, n in window[1:]) / span


def job_status(url: str, storage: StorageConfig | None = None) -> StatusReport:
    """The progress of the job whose output is ``url``; raises NotAJobOutput, StorageError."""
    existing = open_output(url, storage)
    state, job = existing.state, existing.job
    report = StatusReport(
        url,
        job_id=str(job.get("job_id")),
        created_at=str(job.get("created_at", "")),
        rows_total=int((job.get("input") or {}).get("rows") or 0),
    )
    markers = state.markers()
    totals = totals_of(markers)
    report.rows_done, report.error_codes = totals["rows"], totals["error_codes"]
    report.data_rows, report.error_rows = totals["data_rows"], totals["error_rows"]
    commits = [
        (dt.datetime.fromisoformat(m.committed_at), m.num_rows) for m in markers if m.committed_at
    ]
    report.units_committed = totals["units"]
    if commits:
        report.last_commit_at = max(commits)[0].isoformat()
    try:
        metrics = state.metrics() or {}
    except ValueError:
        metrics = {}
    success, ended, lease = state.success(), metrics.get("summary") or {}, read_lease(state)
    dead = why_dead(lease) if lease else None
    if success is not None:
        report.state, report.summary = "complete", success
    elif lease is not None and dead is None:
        report.state, report.driver = "running", _driver(lease)
        report.rows_per_s = commit_rate(commits)
        if report.rows_per_s:
            report.eta_s = report.rows_pending / report.rows_per_s
    elif lease is not None:
        gone = "" if dead.startswith("no heartbeat") else f"; {dead}"  # a dead pid here
        report.state, report.driver = "stopped", _driver(lease, "last heartbeat") + gone
    elif ended.get("status") == "failed":  # metrics of an earlier succeeded run are ignored
        report.state, report.summary = "failed", ended
    return report


def _driver(lease: dict, beat: str = "heartbeat") -> str:
    age = _ago(heartbeat_age(lease))
    return f"driver {lease.get('host')}:{lease.get('pid')}, {beat} {age} ago"


def _ago(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else str(dt.timedelta(seconds=round(seconds)))


def cmd_status(args: argparse.Namespace) -> int:
    """0: the status was printed; 2: no job there, or its ledger cannot be read."""
    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    try:
        report = job_status(args.output, storage)
    except (NotAJobOutput, StorageError) as exc:
        print(f"qvl-batch status: {exc}", file=sys.stderr)
        return Exit.CONFIG
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return Exit.OK


def add_status_parser(sub) -> None:
    """Add ``status OUTPUT [--json] [--endpoint-url URL]`` to an argparse subparsers object."""
    p = sub.add_parser("status", help="progress of a job from its output ledger (rows, rate, ETA)")
    p.add_argument("output", help="the job's output folder (a path or an fsspec URL)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the output")
    p.set_defaults(func=cmd_status)
