"""The driver of ``run``: plan, check the output ledger, start actors, run the units
(``dispatch.Dispatcher``), close the output.

Only unit descriptors go to actors and only small per-row results come back; image bytes never
pass through the driver. Memory is bounded by the units in flight (actors x window).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import Config, with_absolute_paths
from ..errors import Exit
from ..output.fingerprint import fingerprint, fingerprint_fields
from ..output.lease import Lease
from ..output.marker import Marker
from ..output.reuse import build_index
from ..output.saved_config import saved_config
from ..output.schema import part_columns
from ..output.state import OutputState
from ..output.writer import commit_unit
from ..report.totals import error_codes_line, totals_of, versions
from ..rows.manifest import Plan, WorkUnit, job_unit_rows, plan_job
from ..storage import Storage, StorageError, merge_request_stats
from .closing import close_output, error_fraction_problem
from .dispatch import COMMIT_THREADS, Dispatcher, PassResult
from .preflight import preflight
from .progress import Progress
from .validate import validate, with_input_settings

log = logging.getLogger("qvl_batch")


@dataclass
class JobSummary:
    status: str  # running | succeeded | already_complete | failed | nothing_to_retry (retry)
    exit_code: int
    output: str
    job_id: str
    rows_total: int = 0
    rows_this_run: int = 0
    errors_this_run: int = 0
    reused_this_run: int = 0  # rows carried over from reuse.outputs (not computed)
    data_rows: int = 0
    error_rows: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    units_total: int = 0
    units_this_run: int = 0
    unit_retries: int = 0
    actor_restarts: int = 0
    engine_stalls: int = 0  # of those, engines declared dead for silence (limits.stall_s)
    storage_retries: int = 0  # transient storage errors retried (driver and live actors)
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    pipeline_s: float = 0.0  # actors ready -> last commit: the steady-state part of elapsed_s
    units_moved: int = 0  # queued units taken back from a busy actor for an idle one
    moves_refused: int = 0  # ...tried, but the busy actor had started computing the unit
    backup_copies: int = 0  # copies of running units started on idle actors at the tail
    backup_wins: int = 0  # ...whose result came first and was committed
    message: str = ""

    def lines(self) -> list[str]:
        out = [
            f"job {self.job_id}: {self.status.upper()}  ({self.output})",
            f"  rows: {self.rows_total:,} total; {self.data_rows:,} in data/, "
            f"{self.error_rows:,} in errors/",
            f"  this run: {self.rows_this_run:,} rows in {self.units_this_run:,} units, "
            f"{self.elapsed_s:,.1f}s, {self.rows_per_s:,.1f} rows/s",
            *(
                [
                    f"  reused: {self.reused_this_run:,} rows carried over from earlier outputs, "
                    f"{self.rows_this_run - self.reused_this_run:,} computed"
                ]
                if self.reused_this_run
                else []
            ),
            f"  retries: {self.unit_retries} unit retries, {self.actor_restarts} actor restarts"
            + (f" ({self.engine_stalls} engine stalls)" if self.engine_stalls else "")
            + f", {self.storage_retries} storage retries",
        ]
        if self.units_moved or self.backup_copies or self.moves_refused:
            out.append(
                f"  tail: {self.units_moved} units moved to idle actors"
                + (f" ({self.moves_refused} refused: started)" if self.moves_refused else "")
                + f", {self.backup_copies} backup copies ({self.backup_wins} finished first)"
            )
        if self.error_codes:
            out.append(error_codes_line(self.error_codes))
        if self.message:
            out.append(f"  {self.message}")
        return out


class JobWork:
    """A job's units as ``run`` runs them (the :class:`~qvl_batch.run.dispatch.Work` of new rows):
    every row of the unit, committed as new part files then the marker."""

    def __init__(
        self, cfg: Config, state: OutputState, rows_before: int, errors_before: int, lease=None
    ):
        self.cfg, self.state, self.lease = cfg, state, lease
        self.columns = part_columns(cfg)  # data/ and errors/ columns, before lineage
        # A resumed run judges its error fraction over every committed row, not only its own.
        self.rows_before, self.errors_before = rows_before, errors_before

    def run_kwargs(self, unit: WorkUnit) -> dict:
        return {}

    def commit(self, unit: WorkUnit, table, lineage: dict, attempt: int) -> tuple[Marker, dict]:
        if self.lease is not None:
            self.lease.check()  # raises LeaseLost once another driver took the output over
        marker = commit_unit(
            self.state, unit, table, lineage, attempt, self.columns, self.cfg.output.compression
        )
        done = {"num_rows": marker.num_rows, "error_rows": marker.error_rows}
        return marker, {**done, "reused_rows": marker.reused_rows}

    def error_check(self, rows: int, errors: int) -> str | None:
        return error_fraction_problem(
            self.errors_before + errors, self.rows_before + rows, self.cfg.limits, running=True
        )


def new_job_id(cfg: Config) -> str:
    """``<job name>-<UTC time>-<random>``: a run's id, kept by every later resume."""
    stamp = dt.datetime.now(dt.timezone.utc)
    return f"{cfg.job.name}-{stamp:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def lease_lost(lease: Lease | None, summary: JobSummary) -> bool:
    """True (and ``summary`` failed, saying why) when another driver took the lease over."""
    if lease is None or lease.lost is None:
        return False
    summary.status, summary.exit_code = "failed", Exit.FAILED
    summary.message = f"stopped: {lease.lost}; committed units are kept"
    return True


def fill_totals(summary: JobSummary, records: dict[str, Marker]) -> None:
    """The output's totals (every committed unit, this run's and earlier ones) into ``summary``."""
    totals = totals_of(list(records.values()))
    summary.data_rows = totals["data_rows"]
    summary.error_rows = totals["error_rows"]
    summary.error_codes = totals["error_codes"]
    summary.units_total = totals["units"]


def ray_pool(cfg: Config, reuse, job_id: str):
    """The actors of a job: a Ray ActorPool (elastic start, replacements; ``cluster.py``)."""
    from .cluster import ActorPool

    return ActorPool(cfg, reuse=reuse, job_id=job_id)


class Driver:
    """Runs one job to completion (or to a clean failure).

    ``make_pool(cfg, reuse, job_id)`` builds the actors (``ray_pool``; the driver benchmark
    passes a simulated pool).
    """

    def __init__(
        self,
        cfg: Config,
        progress_bar: bool | None = None,
        commit_threads: int = COMMIT_THREADS,
        make_pool=ray_pool,
    ):
        # Local paths absolute: _job.json and the fingerprint must not depend on the directory
        # the driver runs from (verify and retry-failed may run elsewhere; so may actors).
        self.cfg = cfg = with_absolute_paths(cfg)
        self.progress_bar = progress_bar
        self.commit_threads = commit_threads
        self.make_pool = make_pool
        self.input_storage = Storage.for_input(cfg)
        self.state = OutputState(cfg.output.path, Storage.for_output(cfg))
        # Commit markers by unit id: read at start, then this run's as they are written.
        self._records: dict[str, Marker] = {}
        self._reuse = None  # the ReuseIndex of reuse.outputs, built before any work
        self.lease: Lease | None = None  # this driver's hold on the output (prepare takes it)
        self._started_at = time.time()  # this run's start, wall clock (the report's axis)
        self._t0 = time.monotonic()

    # ---- before any work -------------------------------------------------------------
    def prepare(self) -> tuple[Plan, dict, set[str]]:
        """Plan the input, check what the job needs (pre-flight), take the output's lease and
        open its ledger; raises before any work, and before _job.json is written, on problems
        (another live driver's lease: LeaseHeld)."""
        plan = plan_job(self.cfg, self.input_storage)
        self.cfg = with_input_settings(self.cfg, plan.settings)
        preflight(self.cfg, plan, self.state, self.input_storage)
        self._reuse = build_index(self.cfg, self.state.storage)
        fields = fingerprint_fields(self.cfg, plan.fingerprint)
        fp = fingerprint(fields)
        overwrite = self.cfg.output.mode == "overwrite"
        if not overwrite and self.state.success():  # nothing to do: no lease needed
            job = self.state.check_resume(fp, fields)
            if job is not None:
                self._records = {m.unit_id: m for m in self.state.markers()}
                return plan, job, set(self._records)
        # The lease comes before anything that changes the ledger: wiping it (also a failed
        # start's _job.json, in check_resume), or deleting part files no marker names (another
        # live driver's commits in progress look like that).
        self.lease = Lease.acquire(self.state, "starting")
        job = None if overwrite else self.state.check_resume(fp, fields)
        job_id = job["job_id"] if job else new_job_id(self.cfg)
        self.lease.name_job(job_id)
        if overwrite:
            self.state.wipe()
        if job is None:
            job = {
                "job_id": job_id,
                "fingerprint": fp,
                "fingerprint_fields": fields,
                "config": saved_config(self.cfg),
                "versions": versions(),
                "input": {"shards": len(plan.shards), "rows": plan.total_rows},
                "unit_rows": plan.unit_rows,  # a resume cuts the same units (same unit ids)
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
            try:
                self.state.write_json("_job.json", job)
            except OSError as exc:
                raise StorageError(f"output.path {self.state.url}: cannot write: {exc}") from None
            return plan, job, set()
        if plan.unit_rows != (saved := job_unit_rows(job, self.cfg)):
            log.info("resuming with the units the job was planned with (%d rows each)", saved)
            plan.unit_rows = saved
        self._records = {m.unit_id: m for m in self.state.markers()}
        removed = self.state.clean_orphans(list(self._records.values()))
        if removed:
            log.info("removed %d uncommitted part files of an interrupted run", len(removed))
        return plan, job, set(self._records)

    # ---- the run -------------------------------------------------------------------
    def run(self) -> JobSummary:
        """Run the job; the lease is released however the run ends (Ctrl-C and SIGTERM too)."""
        summary = None
        try:
            summary = self._run()
            return summary
        finally:
            if self.lease is not None:
                retried = self.lease.release()
                if summary is not None:
                    summary.storage_retries += retried

    def _run(self) -> JobSummary:
        t0 = self._t0 = time.monotonic()
        self._started_at = time.time()
        plan, job, committed = self.prepare()
        summary = JobSummary("running", Exit.OK, self.state.url, job["job_id"])
        summary.rows_total = plan.total_rows
        # The ledger is read once (prepare); what this run commits is added as it goes.
        if self.state.success():
            summary.status = "already_complete"
            summary.message = "output already complete (_SUCCESS present): nothing to do"
            fill_totals(summary, self._records)
            return summary
        done_before = sum(u.num_rows for u in plan.units() if u.unit_id in committed)
        before = totals_of(list(self._records.values()))
        work = JobWork(self.cfg, self.state, before["rows"], before["error_rows"], self.lease)
        todo: Iterator[WorkUnit] = (u for u in plan.units() if u.unit_id not in committed)
        progress = Progress(plan.total_rows, done_before, bar=self.progress_bar)
        try:
            pool = self.make_pool(self.cfg, self._reuse, job["job_id"])
            dispatcher = Dispatcher(
                self.cfg,
                pool,
                work,
                job,
                summary,
                progress,
                self._records,
                self._t0,
                self.commit_threads,
            )
            outcome = dispatcher.run(todo)
        finally:
            progress.close()
        summary.elapsed_s = time.monotonic() - t0
        summary.rows_per_s = summary.rows_this_run / summary.elapsed_s if summary.elapsed_s else 0
        if lease_lost(self.lease, summary):  # the closing files are the new holder's to write
            fill_totals(summary, self._records)
            return summary
        try:
            return self._close(summary, job, outcome)
        except StorageError as exc:  # committed units are safe; only the closing files failed
            summary.status, summary.exit_code = "failed", Exit.FAILED
            summary.message = f"closing files not written ({exc}); run again to finish"
            return summary

    def _close(self, summary: JobSummary, job: dict, outcome: PassResult) -> JobSummary:
        """Totals, the error-fraction verdict, _metrics.json, the report, then _SUCCESS."""
        fill_totals(summary, self._records)
        timings = outcome.timings

        def storage_stats() -> dict:
            here = merge_request_stats(
                self.input_storage.stats.snapshot(), self.state.storage.stats.snapshot()
            )
            return merge_request_stats(here, outcome.storage)

        storage = storage_stats()
        summary.storage_retries = storage["retries"]
        failure = outcome.failure or error_fraction_problem(
            summary.error_rows, summary.rows_total, self.cfg.limits
        )
        metrics = {
            "job_id": job["job_id"],
            "summary": summary.__dict__,
            "padding": outcome.padding.as_dict(),
            "actor_peak_rss_mib": timings.pop("peak_rss_mib", None),
            "actor_timings_s": timings,
            "actors": outcome.placement,  # pid, node, GPUs, engine modes of each as first started
            "actors_live": [[round(t, 2), n] for t, n in outcome.live_timeline],
            "units_by_actor": outcome.units_by_actor,  # results each actor slot returned
            "started_at": dt.datetime.fromtimestamp(self._started_at, dt.timezone.utc).isoformat(),
            "actor_timeline": _job_timeline(
                outcome.timelines, self._started_at, outcome.generations
            ),
            "unit_runs": outcome.unit_runs,
            "storage": storage,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        if failure:
            summary.status, summary.exit_code, summary.message = "failed", Exit.FAILED, failure
        else:
            summary.status = "succeeded"
        metrics["summary"] = summary.__dict__
        success = None if failure else {"job_id": job["job_id"], **metrics["summary"]}
        close_output(self.state, metrics, success, self.cfg.output.format == "openai-batch")
        # The closing writes may have been retried too: the returned summary counts them.
        summary.storage_retries = storage_stats()["retries"]
        return summary


def _job_timeline(timelines: list[dict], started_at: float, generations: list[int]) -> dict:
    """The actors' busy / waiting / idle bins on the job's axis (seconds since its start), all
    at the widest actor's bin width (widths double as a job grows, so they divide). An actor's
    ``incarnation`` counts its slot's processes: 0 for the first, 1 after one replacement."""
    from .timeline import STATES

    width = max((t["bin_s"] for t in timelines), default=1.0)
    actors = []
    for t in timelines:
        k = round(width / t["bin_s"])
        entry = {
            "actor": t["actor"],
            "incarnation": generations[t["actor"]],
            "gpus": t["gpus"],
            "start_s": round(t["origin"] - started_at, 3),
        }
        for state in STATES:
            series = t[state]
            entry[state] = [round(sum(series[i : i + k]), 3) for i in range(0, len(series), k)]
        actors.append(entry)
    return {"bin_s": width, "actors": actors}


def run_job(cfg: Config, progress_bar: bool | None = None) -> JobSummary:
    """Run (or resume) the job ``cfg`` describes; see :class:`JobSummary` for the outcome."""
    return Driver(validate(cfg), progress_bar).run()
