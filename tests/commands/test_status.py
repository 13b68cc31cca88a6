"""``qvl-batch status``: progress read from the ledger of a finished, then truncated, job."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil

import pytest

from qvl_batch.commands.status import add_status_parser, cmd_status, commit_rate, job_status
from qvl_batch.errors import Exit
from qvl_batch.output.lease import LEASE_FILE
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import write_job

pytestmark = pytest.mark.timeout(600)


def status_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_status_parser(parser.add_subparsers())
    return parser.parse_args(["status", *argv])


@pytest.fixture
def finished(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    summary = run_job(
        load_job(write_job(tmp_path / "job.yaml", dataset, out, ray_head)), progress_bar=False
    )
    assert summary.exit_code == Exit.OK, summary.lines()
    return out, summary


@pytest.mark.slow
def test_status_of_complete_job_matches_its_summary(finished, capsys):
    out, summary = finished
    report = job_status(str(out))
    assert report.state == "complete" and report.job_id == summary.job_id
    assert report.rows_done == report.rows_total == summary.rows_total == 240
    assert report.rows_pending == 0
    assert report.rows_per_s is None and report.eta_s is None  # ended: totals only
    assert (report.data_rows, report.error_rows) == (summary.data_rows, summary.error_rows)
    assert report.error_codes == summary.error_codes and report.error_rows > 0
    assert report.units_committed == summary.units_total
    assert report.summary["data_rows"] == summary.data_rows

    assert cmd_status(status_args(str(out), "--json")) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["state"] == "complete" and parsed["rows_pending"] == 0
    assert parsed["error_codes"] == summary.error_codes


@pytest.mark.slow
def test_status_says_running_or_not_from_the_lease(finished, tmp_path, capsys):
    """The same truncated ledger: a rate and an ETA only while a driver's heartbeat is fresh;
    a lease gone stale, or no lease at all, is a job that is not running."""
    src, _ = finished
    assert not (src / LEASE_FILE).exists()  # the run released its lease
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "_SUCCESS").unlink()  # _metrics.json stays: a succeeded run's does not mean failed
    markers = sorted((out / "_state" / "units").glob("*.json"))
    deleted = markers[:2]
    lost = sum(json.loads(p.read_text())["num_rows"] for p in deleted)
    for p in deleted:
        p.unlink()

    _lease(out, age_s=3)
    report = job_status(str(out))
    assert report.state == "running" and "driver host-a:4242, heartbeat 3 s ago" in report.driver
    assert report.rows_pending == lost > 0
    assert report.units_committed == len(markers) - 2
    assert report.rows_per_s is not None and report.rows_per_s > 0
    assert report.eta_s == pytest.approx(lost / report.rows_per_s)
    assert cmd_status(status_args(str(out))) == 0
    text = capsys.readouterr().out
    assert "running (driver host-a:4242, heartbeat 3 s ago)" in text
    assert f"{lost:,} pending" in text and "ETA" in text

    _lease(out, age_s=600)
    report = job_status(str(out))
    assert report.state == "stopped" and report.rows_per_s is None and report.eta_s is None
    assert cmd_status(status_args(str(out))) == 0
    text = capsys.readouterr().out
    assert "not running: the driver stopped (driver host-a:4242, last heartbeat 0:10:00 ago)" in (
        text
    )
    assert "rows/s" not in text and "ETA" not in text

    (out / LEASE_FILE).unlink()
    report = job_status(str(out))
    assert report.state == "interrupted" and report.eta_s is None
    assert cmd_status(status_args(str(out))) == 0
    assert "not running: interrupted" in capsys.readouterr().out


def _lease(out, age_s: float) -> None:
    beat = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)).isoformat()
    lease = {"job_id": "j", "host": "host-a", "pid": 4242, "token": "t" * 32}
    (out / LEASE_FILE).write_text(json.dumps({**lease, "heartbeat_at": beat}))


def test_status_without_job_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cmd_status(status_args(str(tmp_path / "empty"))) == 2
    assert "no _job.json" in capsys.readouterr().err


def test_status_failed_job_from_metrics(tmp_path, capsys):
    job = {"job_id": "j1", "input": {"rows": 10}, "created_at": "2024-01-01T00:00:00+00:00"}
    (tmp_path / "_job.json").write_text(json.dumps(job))
    (tmp_path / "_metrics.json").write_text(json.dumps({"summary": {"status": "failed"}}))
    assert cmd_status(status_args(str(tmp_path), "--json")) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["state"] == "failed" and parsed["rows_pending"] == 10
    assert parsed["eta_s"] is None


def test_commit_rate_uses_the_recent_window():
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    at = lambda s: t0 + dt.timedelta(seconds=s)  # noqa: E731
    assert commit_rate([(at(0), 10)]) is None
    assert commit_rate([(at(0), 10), (at(10), 30)]) == pytest.approx(3.0)
    # an old slow start falls outside the last 300 s: 2 x 100 rows over 100 s
    commits = [(at(0), 5), (at(1000), 100), (at(1050), 100), (at(1100), 100)]
    assert commit_rate(commits) == pytest.approx(2.0)
