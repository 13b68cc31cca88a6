"""The run loop (dispatch.Dispatcher) over an in-process pool: every unit committed once, a
failed commit retried, a Work's error check stopping the pass. Ray-level behaviour (actor
deaths, moves, backup copies) is tested end to end in test_handout, test_chaos, test_elastic."""

from __future__ import annotations

import threading

from qvl_batch.bench.driver import SimulatedPool
from qvl_batch.errors import Exit
from qvl_batch.output.marker import Marker
from qvl_batch.output.writer import UnitIncomplete
from qvl_batch.rows.manifest import WorkUnit
from qvl_batch.run.dispatch import Dispatcher
from qvl_batch.run.driver import JobSummary
from qvl_batch.run.progress import Progress
from qvl_batch.run.validate import load_job

JOB = {"job_id": "job-1", "fingerprint": "fp"}


class RecordingWork:
    """Commits nothing to storage: records what it was asked to commit."""

    def __init__(self, incomplete_once: set[str] = frozenset(), stop_after: int = 0):
        self.commits: list[tuple[str, int, int]] = []  # (unit, attempt, rows in the table)
        self.lineages: list[dict] = []
        self.incomplete_once = set(incomplete_once)
        self.stop_after = stop_after
        self.lock = threading.Lock()

    def run_kwargs(self, unit: WorkUnit) -> dict:
        return {}

    def commit(self, unit: WorkUnit, table, lineage: dict, attempt: int):
        with self.lock:
            if unit.unit_id in self.incomplete_once:
                self.incomplete_once.discard(unit.unit_id)
                raise UnitIncomplete(f"unit {unit.unit_id}: a row is missing")
            self.commits.append((unit.unit_id, attempt, table.num_rows))
            self.lineages.append(dict(lineage))
        marker = Marker(unit.unit_id, unit.shard_url, unit.row_start, unit.num_rows, 0, 0, [])
        return marker, {"num_rows": unit.num_rows, "error_rows": 0, "reused_rows": 0}

    def error_check(self, rows: int, errors: int) -> str | None:
        if self.stop_after and rows >= self.stop_after:
            return f"stop after {rows} rows"
        return None


def units(n: int, rows: int = 10) -> list[WorkUnit]:
    return [WorkUnit(f"u{i}", 0, "mem://s", i * rows, rows) for i in range(n)]


def dispatch(work, todo, actors=2, latency_s=0.01, **overrides):
    cfg = load_job(
        None,
        ["input.paths=[-]", "output.path=unused", *[f"{k}={v}" for k, v in overrides.items()]],
    )
    summary = JobSummary("running", Exit.OK, "unused", JOB["job_id"])
    records: dict = {}
    pool = SimulatedPool(actors, latency_s)
    progress = Progress(sum(u.num_rows for u in todo), bar=False)
    out = Dispatcher(cfg, pool, work, JOB, summary, progress, records, 0.0, 2).run(iter(todo))
    return out, summary, records


def test_every_unit_is_committed_once_with_the_engine_in_its_lineage():
    work = RecordingWork()
    out, summary, records = dispatch(work, units(9))
    assert out.failure is None
    assert sorted(u for u, _, _ in work.commits) == [f"u{i}" for i in range(9)]
    assert all(rows == 10 for _, _, rows in work.commits)
    assert set(records) == {f"u{i}" for i in range(9)}
    assert summary.rows_this_run == 90 and summary.units_this_run == 9
    assert sum(out.units_by_actor) == 9 and min(out.units_by_actor) >= 1  # both actors worked
    assert [r["outcome"] for r in out.unit_runs] == ["committed"] * 9
    assert {lin["engine"] for lin in work.lineages} == {"simulated"}
    assert {lin["job_id"] for lin in work.lineages} == {"job-1"}


def test_a_commit_found_incomplete_runs_the_unit_again():
    work = RecordingWork(incomplete_once={"u2"})
    out, summary, _ = dispatch(work, units(4))
    assert out.failure is None
    assert sorted((u, a) for u, a, _ in work.commits if u == "u2") == [("u2", 2)]
    assert summary.unit_retries == 1 and summary.units_this_run == 4


def test_the_works_error_check_stops_the_pass():
    work = RecordingWork(stop_after=20)
    out, summary, _ = dispatch(work, units(40), actors=1, latency_s=0.02)
    assert out.failure is not None and out.failure.startswith("stop after")
    assert summary.units_this_run < 40  # the loop stopped handing out units


def test_a_unit_that_keeps_failing_its_commit_fails_the_pass():
    class Never(RecordingWork):
        def commit(self, unit, table, lineage, attempt):
            raise UnitIncomplete(f"unit {unit.unit_id}: never complete")

    out, _, records = dispatch(Never(), units(1), **{"limits.max_unit_attempts": 2})
    assert out.failure is not None and "failed 2 times" in out.failure
    assert records == {}
