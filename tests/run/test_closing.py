"""How a run ends (closing.py): the error-fraction rule, judged mid-run or at the end, and the
closing files written in order (metrics, report, then ``_SUCCESS`` only on success)."""

from __future__ import annotations

import json

import fsspec

from qvl_batch.config import LimitsConfig
from qvl_batch.output.state import OutputState
from qvl_batch.report import html as report_html
from qvl_batch.run.closing import close_output, error_fraction_problem


def test_final_judgement_counts_every_row_and_allows_the_limit_itself():
    limits = LimitsConfig(max_error_fraction=0.1, min_rows_for_error_check=1000)
    assert error_fraction_problem(0, 0, limits) is None  # no rows: nothing to judge
    assert error_fraction_problem(1, 10, limits) is None  # exactly at the limit is allowed
    assert error_fraction_problem(2, 10, limits) == (
        "error fraction 0.200 is over limits.max_error_fraction 0.1"
    )
    assert error_fraction_problem(2, 10, limits, still=True) == (
        "error fraction 0.200 is still over limits.max_error_fraction 0.1"
    )


def test_running_judgement_waits_for_min_rows_then_says_stopping():
    limits = LimitsConfig(max_error_fraction=0.1, min_rows_for_error_check=1000)
    # all of 999 rows failed, but too few rows yet to fail the job mid-run
    assert error_fraction_problem(999, 999, limits, running=True) is None
    assert error_fraction_problem(100, 1000, limits, running=True) is None
    assert error_fraction_problem(101, 1000, limits, running=True) == (
        "error fraction 0.101 after 1,000 rows is over limits.max_error_fraction 0.1: stopping"
    )
    # the same 999 rows judged at the end do fail
    assert error_fraction_problem(999, 999, limits) is not None


def _recording_state(root: str) -> tuple[OutputState, list[str]]:
    state = OutputState(root)
    writes: list[str] = []
    write_bytes = state.write_bytes

    def logged(name, blob):
        writes.append(name)
        return write_bytes(name, blob)

    state.write_bytes = logged
    return state, writes


def test_close_output_writes_metrics_then_report_then_success(monkeypatch):
    monkeypatch.setattr(report_html, "build_report", lambda state: b"<html>report</html>")
    fs = fsspec.filesystem("memory")
    state, writes = _recording_state("memory://closing-ok")
    close_output(state, {"rows": 3}, {"job_id": "j"})
    assert writes == ["_metrics.json", "_report.html", "_SUCCESS"]
    assert json.loads(fs.cat_file("/closing-ok/_metrics.json")) == {"rows": 3}
    assert fs.cat_file("/closing-ok/_report.html") == b"<html>report</html>"
    assert json.loads(fs.cat_file("/closing-ok/_SUCCESS")) == {"job_id": "j"}


def test_close_output_without_success_writes_no_success_file(monkeypatch, tmp_path):
    monkeypatch.setattr(report_html, "build_report", lambda state: b"<html/>")
    state, writes = _recording_state(str(tmp_path / "out"))
    close_output(state, {"rows": 3}, None)
    assert writes == ["_metrics.json", "_report.html"]
    assert state.metrics() == {"rows": 3}
    assert state.success() is None
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_a_failing_report_does_not_stop_success(monkeypatch, tmp_path):
    def build(state):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_html, "build_report", build)
    state, writes = _recording_state(str(tmp_path / "out"))
    close_output(state, {"rows": 3}, {"job_id": "j"})
    assert writes == ["_metrics.json", "_SUCCESS"]
    assert not (tmp_path / "out" / "_report.html").exists()
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text()) == {"job_id": "j"}
