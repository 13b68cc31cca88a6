"""``_report.html`` "Actors over time" and throughput from job start, on a fake output folder.

Fast: no Ray and no job run. The output holds a ``_job.json``, a ``_metrics.json`` with the
driver's ``started_at`` / ``actor_timeline`` / ``unit_runs`` and commit markers listing no part
files (so the per-row plots read nothing).
"""

from __future__ import annotations

import datetime as dt
import time
from html.parser import HTMLParser

import pytest

from qvl_batch.output.marker import Marker
from qvl_batch.output.state import METRICS_FILE, OutputState
from qvl_batch.report.html import build_report, write_report

IMG = '<img src="data:image/png;base64,'
STARTED = dt.datetime(2026, 11, 25, 23, 40, 1, 123456, tzinfo=dt.timezone.utc)
ELAPSED = 20.0
HALF = 8  # actor 1 works its first 8 bins, then sits idle for the second half

# Two actors from 4 s after job start, 16 bins of 1 s (actor 1's last bin is 0.6 s long).
ACTORS = [
    {
        "actor": 0,
        "incarnation": 0,
        "gpus": "0",
        "start_s": 4.0,
        "busy": [0.0, 0.5] + [1.0] * 14,
        "waiting": [1.0, 0.5] + [0.0] * 14,
        "idle": [0.0] * 16,
    },
    {
        "actor": 1,
        "incarnation": 1,
        "gpus": "1",
        "start_s": 4.0,
        "busy": [0.0] + [1.0] * (HALF - 1) + [0.0] * HALF,
        "waiting": [1.0] + [0.0] * (HALF - 1) + [0.0] * HALF,
        "idle": [0.0] * HALF + [1.0] * (HALF - 1) + [0.6],
    },
]


def _run(actor, unit, start, end, outcome="committed", copy=False):
    return {
        "actor": actor,
        "unit_id": unit,
        "start_s": start,
        "end_s": end,
        "outcome": outcome,
        "copy": copy,
    }


UNIT_RUNS = [
    _run(0, "s0-u0", 4.2, 12.0),
    _run(1, "s0-u1", 4.3, 11.5),
    _run(1, "s0-u3", 4.3, 6.0, "moved"),
    _run(1, "s0-u4", 4.1, 4.2, "failed"),
    _run(0, "s0-u1", 10.0, 11.6, "discarded", copy=True),
    _run(0, "s0-u2", 12.0, 19.5),
]
# unit -> (rows, seconds after job start it was committed); the negative one is a resumed
# job's earlier run, which the from-start throughput plot leaves out.
COMMITS = {"s0-old": (10, -3600.0), "s0-u1": (10, 11.5), "s0-u0": (10, 12.0), "s0-u2": (10, 19.5)}
ROWS_THIS_RUN = sum(n for n, at in COMMITS.values() if at >= 0)


def _metrics(**extra) -> dict:
    summary = {
        "status": "succeeded",
        "rows_this_run": ROWS_THIS_RUN,
        "elapsed_s": ELAPSED,
        "rows_per_s": ROWS_THIS_RUN / ELAPSED,
        "pipeline_s": 15.0,
    }
    return {"summary": summary, "padding": {}, **extra}


FULL = {
    "started_at": STARTED.isoformat(),
    "actor_timeline": {"bin_s": 1.0, "actors": ACTORS},
    "unit_runs": UNIT_RUNS,
}


@pytest.fixture
def out(tmp_path):
    state = OutputState(str(tmp_path / "out"))
    state.write_json(
        "_job.json",
        {
            "job_id": "job-fast",
            "config": {"job": {"name": "fast"}, "engine": {"model": "m", "name": "fake"}},
            "input": {"rows": sum(n for n, _ in COMMITS.values())},
        },
    )
    for unit, (rows, at) in COMMITS.items():
        marker = Marker(
            unit_id=unit,
            shard="mem://shard",
            row_start=0,
            num_rows=rows,
            data_rows=rows,
            error_rows=0,
            files=[],
            committed_at=(STARTED + dt.timedelta(seconds=at)).isoformat(),
        )
        state.mark_committed(marker)
    state.write_json(METRICS_FILE, _metrics(**FULL))
    return state


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (th and td alike)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end >= 0 else len(page)]


def _summary(page: str) -> dict[str, str]:
    return dict(_Tables(_section(page, "Summary")).tables[0])


def _actor_rows(page: str) -> dict[str, dict[str, str]]:
    (table,) = _Tables(_section(page, "Actors over time")).tables
    header, *rows = table
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_actor_timeline_table_and_whole_job_rate(out):
    write_report(out)
    page = (out.fs.cat_file(out.path("_report.html"))).decode()
    section = _section(page, "Actors over time")
    assert section.count(IMG) == 1 and "busy" in section and "straggler" in section
    assert page.count(IMG) == 4  # throughput, actors over time, sizes (empty), latency

    rows = _actor_rows(page)
    assert set(rows) == {"0", "1"}
    for a in ACTORS:
        row, mine = rows[str(a["actor"])], [r for r in UNIT_RUNS if r["actor"] == a["actor"]]
        assert row["GPUs"] == a["gpus"] and row["incarnation"] == str(a["incarnation"])
        for state in ("busy", "waiting", "idle"):
            assert row[state] == f"{sum(a[state]) / ELAPSED:.1%}", (a["actor"], state)
        tracked = sum(sum(a[s]) for s in ("busy", "waiting", "idle"))
        assert row["not tracked"] == f"{1 - tracked / ELAPSED:.1%}"
        for column, outcome in [("units committed", "committed"), ("moved", "moved")]:
            assert row[column] == str(sum(r["outcome"] == outcome for r in mine))
        assert row["copies run"] == str(sum(r["copy"] for r in mine))
        committed = sum(r["outcome"] == "committed" for r in UNIT_RUNS)
        assert row["even share"] == f"{committed / len(ACTORS):.1f}"  # a hoard stands out
    # The fixture's shape, so the checks above mean what they say: actor 1 idles half the job.
    assert rows["1"]["idle"] == f"{(HALF - 0.4) / ELAPSED:.1%}" == "38.0%"
    assert rows["0"]["idle"] == "0.0%" and rows["0"]["units committed"] == "2"
    assert rows["0"]["last commit (sec)"] == "19.5"

    summary = _summary(page)
    whole = summary["rows/s (whole job)"]
    assert whole.startswith(f"{ROWS_THIS_RUN / ELAPSED:,.1f} (") and f"{ELAPSED:,.1f} s" in whole
    assert summary["rows/s (steady)"].startswith(f"{ROWS_THIS_RUN / 15.0:,.1f} (")
    throughput = _section(page, "Throughput")
    assert "from the start of this run" in throughput
    assert "Left out: 1 unit(s) committed by earlier runs" in throughput


@pytest.mark.parametrize(
    "case", ["no new keys", "no _metrics.json", "timeline malformed", "before this run"]
)
def test_renders_without_timeline(out, case):
    if case == "no new keys":
        out.write_json(METRICS_FILE, _metrics())
        note, since = "No actor timeline (not in _metrics.json", "no start time in _metrics.json"
    elif case == "no _metrics.json":
        out.remove([out.path(METRICS_FILE)])
        note, since = "No actor timeline (no _metrics.json yet", "no start time in _metrics.json"
    elif case == "timeline malformed":
        bad = {**FULL, "actor_timeline": {"bin_s": 1.0, "actors": [{"busy": "x"}]}}
        out.write_json(METRICS_FILE, _metrics(**bad))
        note, since = "Actor timeline unreadable", "from the start of this run"
    else:  # a run that committed nothing yet: every marker is older than its start
        later = STARTED + dt.timedelta(days=1)
        out.write_json(METRICS_FILE, _metrics(**{**FULL, "started_at": later.isoformat()}))
        note, since = None, "this run committed none"
    page = build_report(out).decode()
    section = _section(page, "Actors over time")
    if note:
        assert note in section and IMG not in section
    assert since in _section(page, "Throughput")
    assert page.rstrip().endswith("</html>")
    assert _summary(page)["units committed"] == str(len(COMMITS))


def test_long_job_draws_in_bounded_time(out):
    """8 actors x 3,000 bins and 4,000 unit runs: a 3.3 h job stays quick to draw."""
    bins, bin_s = 3000, 4.0
    actors = [
        {
            "actor": a,
            "incarnation": 0,
            "gpus": str(a),
            "start_s": 30.0 + a,
            "busy": [bin_s * ((i + a) % 5 != 0) for i in range(bins)],
            "waiting": [bin_s * ((i + a) % 5 == 0) for i in range(bins)],
            "idle": [0.0] * bins,
        }
        for a in range(8)
    ]
    runs = [
        _run(i % 8, f"s{i}", 30 + i * 3.0, 30 + i * 3.0 + 24, copy=i % 50 == 0) for i in range(4000)
    ]
    elapsed = 30 + bins * bin_s
    metrics = {**FULL, "actor_timeline": {"bin_s": bin_s, "actors": actors}, "unit_runs": runs}
    metrics = _metrics(**metrics)
    metrics["summary"]["elapsed_s"] = elapsed
    out.write_json(METRICS_FILE, metrics)
    t0 = time.perf_counter()
    page = build_report(out).decode()
    took = time.perf_counter() - t0
    assert _section(page, "Actors over time").count(IMG) == 1
    assert len(_actor_rows(page)) == 8
    assert took < 30, f"report took {took:.1f} s"
