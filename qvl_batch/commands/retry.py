"""``qvl-batch retry-failed OUTPUT``: run a finished job's error rows again and fold them in.

The job's saved config is the starting point; ``key=value`` overrides may change how rows are
made (a larger ``image.max_image_pixels``, more ``sampling.max_tokens``, another model), never
which rows there are (the input and its columns must be those of the job). Only units with
error rows run, and in them only those rows (``--codes`` narrows them to some error codes).
Each unit is committed on its own: fixed rows go to a new data part file, the rows still failing
(and those not retried) to a new errors file, then the unit's marker is rewritten (the commit
point) and the old errors file deleted. Every id stays in exactly one place; ``verify`` checks
it, accepting rows whose lineage names this pass (the marker lists each pass).

``_SUCCESS`` is removed while a pass runs and written again at its end (when the error fraction
is within ``limits.max_error_fraction``), so readers can tell an output being changed; it and
``_metrics.json``'s summary then tell this pass's outcome. A pass takes the output's lease.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ConfigError, load_config
from ..errors import Exit
from ..output.fingerprint import fingerprint, fingerprint_fields
from ..output.lease import Lease
from ..output.marker import Marker
from ..output.schema import part_columns
from ..output.state import ERRORS_DIR, SUCCESS_FILE, OutputState
from ..output.writer import commit_retry
from ..rows.manifest import WorkUnit, job_unit_rows, plan_job
from ..run.closing import close_output, error_fraction_problem
from ..run.dispatch import Dispatcher
from ..run.driver import JobSummary, fill_totals, lease_lost, ray_pool
from ..run.progress import Progress
from ..storage import Storage, StorageError
from .existing_output import open_output

log = logging.getLogger("qvl_batch")


class RetryWork:
    """The error rows of a finished job as units (the :class:`~qvl_batch.run.dispatch.Work` of
    retry-failed): only those rows run; a commit folds them into the unit's files."""

    def __init__(self, state: OutputState, records: dict[str, Marker], columns, compression):
        self.state, self.records = state, records
        self.lease: Lease | None = None  # the pass's hold on the output, taken in prepare
        self.columns, self.compression = columns, compression
        self.rows: dict[str, tuple[pa.Table, pa.Table | None]] = {}  # unit -> (retry, keep)

    def run_kwargs(self, unit: WorkUnit) -> dict:
        retry, _ = self.rows[unit.unit_id]
        rows = pc.subtract(retry["source_row"], unit.row_start).to_pylist()
        return {"only": sorted(rows)}

    def commit(self, unit: WorkUnit, table, lineage: dict, attempt: int):
        if self.lease is not None:
            self.lease.check()  # raises LeaseLost once another driver took the output over
        retry, keep = self.rows[unit.unit_id]
        marker = self.records[unit.unit_id]
        return commit_retry(
            self.state, unit, table, lineage, marker, retry, keep, self.columns, self.compression
        )

    def error_check(self, rows: int, errors: int) -> str | None:
        return None  # a pass fixes errors; the fraction is judged at its end


class RetryPass:
    """One retry-failed pass over a finished output: its units with error rows, run by the
    same loop as a job (``dispatch.Dispatcher``), then the output closed again."""

    def __init__(
        self, url: str, overrides: list[str], codes: list[str], progress_bar=None, make_pool=None
    ):
        # storage.* overrides (an endpoint, a region) are needed to read _job.json at all.
        reach = [o for o in overrides if o.startswith("storage.")]
        reach += ["input.paths=[-]", f"output.path={url}"]
        existing = open_output(url, load_config(None, reach).storage)
        self.job = existing.job
        try:
            cfg = existing.config(overrides=overrides)
        except ConfigError as exc:
            raise ConfigError(f"retry-failed: {exc}") from None
        self.cfg = cfg
        self.progress_bar = progress_bar
        self.make_pool = make_pool or ray_pool
        self.input_storage = Storage.for_input(cfg)
        self.state = existing.reopened(cfg)
        self.codes = set(codes)
        self._records: dict[str, Marker] = {}  # every unit's marker, rewritten as units commit
        self.work = RetryWork(self.state, self._records, part_columns(cfg), cfg.output.compression)

    # ---- before any work ---------------------------------------------------------------
    def _check_same_rows(self, plan) -> dict:
        """The fingerprint fields of this pass; raises unless its rows are the job's rows."""
        saved = self.job.get("fingerprint_fields") or {}
        now = fingerprint_fields(self.cfg, plan.fingerprint)
        for key in ("input", "columns"):
            if saved.get(key) != now[key]:
                raise ConfigError(
                    f"retry-failed: the job's {key} changed ({saved.get(key)} then, {now[key]} "
                    "now); retry-failed reruns rows of the same input: drop input.* overrides, "
                    "or run a new job"
                )
        before = (saved.get("structured") or {}).get("columns")
        after = (now.get("structured") or {}).get("columns")
        if before != after:
            raise ConfigError(
                f"retry-failed: structured output columns {before} then, {after} now: the "
                "data/ schema must stay the same"
            )
        return now

    def prepare(self):
        plan = plan_job(self.cfg, self.input_storage, job_unit_rows(self.job, self.cfg))
        fields = self._check_same_rows(plan)
        records = self.state.markers()
        self._records.update({m.unit_id: m for m in records})
        pending = [u.unit_id for u in plan.units() if u.unit_id not in self._records]
        if pending:
            raise ConfigError(
                f"retry-failed {self.state.url}: {len(pending)} units are not committed yet "
                "(the job has not finished): run the job again, it resumes; then retry-failed"
            )
        stamp = dt.datetime.now(dt.timezone.utc)
        job = {
            **self.job,
            "job_id": f"{self.job['job_id']}.retry-{stamp:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}",
            "fingerprint": fingerprint(fields),
        }
        # Like a run: no other driver may be writing while this pass deletes and rewrites.
        self.work.lease = Lease.acquire(self.state, job["job_id"])
        removed = self.state.clean_orphans(records)  # a pass that died mid-commit
        if removed:
            log.info("removed %d part files no marker names (an interrupted pass)", len(removed))
        return plan, job

    def _select(self, plan) -> list[WorkUnit]:
        """Units with error rows to retry; reads their errors files (small)."""
        units = []
        for unit in plan.units():
            marker = self._records[unit.unit_id]
            if not marker.error_rows:
                continue
            if self.codes and not self.codes & set(marker.error_codes):
                continue
            errors = [
                pq.read_table(io.BytesIO(self.state.read_path(self.state.path(f))))
                for f in marker.files
                if f.startswith(f"{ERRORS_DIR}/")
            ]
            table = pa.concat_tables(errors)
            if self.codes:
                mask = pc.is_in(table["error_code"], value_set=pa.array(sorted(self.codes)))
                retry, keep = table.filter(mask), table.filter(pc.invert(mask))
            else:
                retry, keep = table, None
            if retry.num_rows:
                self.work.rows[unit.unit_id] = (retry, keep)
                units.append(unit)
        return units

    # ---- the pass ----------------------------------------------------------------------
    def run(self) -> JobSummary:
        """Run the pass; the lease is released however it ends (Ctrl-C and SIGTERM too)."""
        summary = None
        try:
            summary = self._run()
            return summary
        finally:
            if self.work.lease is not None:
                retried = self.work.lease.release()
                if summary is not None:
                    summary.storage_retries += retried

    def _run(self) -> JobSummary:
        t0 = time.monotonic()
        plan, job = self.prepare()
        units = self._select(plan)
        summary = JobSummary("running", Exit.OK, self.state.url, job["job_id"])
        summary.rows_total = plan.total_rows
        rows = sum(self.work.rows[u.unit_id][0].num_rows for u in units)
        if not units:
            summary.status = "nothing_to_retry"
            summary.message = "no error rows"
            if self.codes:
                summary.message += f" with codes {sorted(self.codes)}"
            fill_totals(summary, self._records)
            return summary
        log.info("retrying %d error rows in %d units", rows, len(units))
        self.state.remove([self.state.path(SUCCESS_FILE)])
        progress = Progress(rows, 0, bar=self.progress_bar)
        try:
            pool = self.make_pool(self.cfg, None, job["job_id"])
            dispatcher = Dispatcher(
                self.cfg, pool, self.work, job, summary, progress, self._records, t0
            )
            failure = dispatcher.run(iter(units)).failure
        finally:
            progress.close()
        summary.elapsed_s = time.monotonic() - t0
        summary.rows_per_s = summary.rows_this_run / summary.elapsed_s if summary.elapsed_s else 0
        fixed = summary.rows_this_run - summary.errors_this_run
        summary.message = (
            f"retried {summary.rows_this_run:,} of {rows:,} error rows: {fixed:,} now in data/, "
            f"{summary.errors_this_run:,} still failing"
        )
        if lease_lost(self.work.lease, summary):  # the closing files are the new holder's
            fill_totals(summary, self._records)
            return summary
        try:
            self._finish(summary, job, failure)
        except StorageError as exc:
            summary.status, summary.exit_code = "failed", Exit.FAILED
            summary.message += f"; closing files not written ({exc}); run again to finish"
        return summary

    def _finish(self, summary: JobSummary, job: dict, failure: str | None) -> None:
        """``_metrics.json`` and ``_SUCCESS`` rewritten with this pass's outcome (an earlier
        run's "failed" would otherwise outlive a pass that fixed it)."""
        fill_totals(summary, self._records)
        metrics = self.state.metrics() or {}
        metrics.setdefault("retries", []).append(
            {
                "job_id": job["job_id"],
                "rows": summary.rows_this_run,
                "still_failing": summary.errors_this_run,
                "elapsed_s": round(summary.elapsed_s, 3),
                "failure": failure,
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
        )
        failure = failure or error_fraction_problem(
            summary.error_rows, summary.rows_total, self.cfg.limits, still=True
        )
        if failure:
            summary.status, summary.exit_code = "failed", Exit.FAILED
            summary.message += f"; {failure}"
        else:
            summary.status = "succeeded"
        keys = ("data_rows", "error_rows", "error_codes", "status", "exit_code", "message")
        outcome = {k: getattr(summary, k) for k in keys}
        earlier = metrics.get("summary") or {}
        metrics["summary"] = {**earlier, **outcome, "last_pass": job["job_id"]}
        # _SUCCESS names the job (verify checks it), whichever pass closed the output.
        success = None if failure else {**metrics["summary"], "job_id": self.job["job_id"]}
        close_output(self.state, metrics, success, self.cfg.output.format == "openai-batch")


def cmd_retry_failed(args: argparse.Namespace) -> int:
    codes = [c.strip() for c in (args.codes or "").split(",") if c.strip()]
    driver = RetryPass(
        args.output, list(args.overrides), codes, None if not args.no_progress else False
    )
    summary = driver.run()
    for line in summary.lines():
        print(line)
    return summary.exit_code


def add_retry_parser(sub) -> None:
    p = sub.add_parser(
        "retry-failed", help="run a finished job's error rows again and fold the results in"
    )
    p.add_argument("output", help="the job's output folder (a path or an fsspec URL)")
    p.add_argument("overrides", nargs="*", help="section.key=value: new settings for the retry")
    p.add_argument("--codes", help="only rows with these error codes (comma-separated)")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")
    p.set_defaults(func=cmd_retry_failed)
