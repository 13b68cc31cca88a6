"""``_report.html`` from a real small job: plots embedded, totals and error codes shown."""

from __future__ import annotations

import json
import shutil

import pytest

from qvl_batch.errors import Exit
from qvl_batch.output.state import OutputState
from qvl_batch.report.html import write_report
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMG = '<img src="data:image/png;base64,'


@pytest.fixture
def finished(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", dataset, out, ray_head)
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    assert summary.error_codes, "the fixture must contain error rows"
    return out, summary


def _render(out) -> str:
    path = write_report(OutputState(str(out)))
    assert path.endswith("_report.html")
    report = out / "_report.html"
    assert report.exists()
    return report.read_text()


def test_report_has_plots_totals_and_error_codes(finished):
    out, summary = finished
    page = _render(out)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert summary.job_id in page
    metrics = json.loads((out / "_metrics.json").read_text())
    # Actors over time: a plot where the driver recorded a timeline, else a note.
    assert "<h2>Actors over time</h2>" in page
    assert page.count(IMG) == 4 + ("actor_timeline" in metrics)
    if "started_at" in metrics:
        assert "from the start of this run" in page
    for code, n in summary.error_codes.items():
        assert f"<th>{code}</th><td>{n}</td>" in page
    assert f"<th>data rows</th><td>{summary.data_rows:,}</td>" in page
    assert f"<th>error rows</th><td>{summary.error_rows:,}</td>" in page
    assert f"{summary.rows_total:,} of {summary.rows_total} planned" in page
    assert "padding fraction" in page and "storage retries" in page
    assert "unit commit latency" in page.lower()
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained


def test_report_renders_without_metrics(finished, tmp_path):
    out, summary = finished
    copy = tmp_path / "running"
    shutil.copytree(out, copy)
    (copy / "_metrics.json").unlink()
    (copy / "_report.html").unlink(missing_ok=True)
    page = _render(copy)
    assert summary.job_id in page and "no _metrics.json" in page
    assert page.count(IMG) == 4  # batch sizes panel says it has no data; the figure stays
    assert "No actor timeline (no _metrics.json yet" in page
    assert json.loads((copy / "_job.json").read_text())["job_id"] == summary.job_id


def test_report_counts_batches_the_token_budget_cut(finished, tmp_path):
    out, _ = finished
    assert "max_tokens_per_batch" not in _render(out), "none were cut: no row"
    copy = tmp_path / "capped"
    shutil.copytree(out, copy)
    metrics = json.loads((copy / "_metrics.json").read_text())
    padding = metrics["padding"]
    assert padding["token_capped_batches"] == 0
    padding["token_capped_batches"] = 3
    (copy / "_metrics.json").write_text(json.dumps(metrics))
    page = _render(copy)
    want = f"<th>batches cut by batching.max_tokens_per_batch</th><td>3 of {padding['batches']:,}"
    assert want in page
