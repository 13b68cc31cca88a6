"""The driver: plan, check the output ledger, start actors, hand out units, commit results.

Only unit descriptors go to actors and only small per-row results come back; image bytes never
pass through the driver. Memory is bounded by the units in flight (actors x window).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from .closing import close_output, error_fraction_problem
from .config import Config, fingerprint, fingerprint_fields, saved_config
from .errors import Exit
from .handout import HandOut, Run, Runs
from .isolation import CrashIsolation
from .manifest import Plan, WorkUnit, plan_job
from .marker import Marker
from .progress import Progress
from .report import error_codes_line, totals_of, versions
from .reuse import build_index
from .schedule import Committer, UnitQueue
from .schema import part_columns
from .state import OutputState
from .storage import Storage, StorageError, merge_request_stats
from .writer import UnitIncomplete, commit_unit

log = logging.getLogger("qvl_batch")


COMMIT_THREADS = 8  # default: units written at once (part files, then the marker)
# A slot whose engine constructor raised this many times in a row is a deterministic start
# failure (bad model path, missing package, out of memory at load), not bad luck.
START_ATTEMPTS = 2
PENDING_COMMITS_PER_THREAD = 4  # no new units are handed out past this many per thread


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
    storage_retries: int = 0  # transient storage errors retried (driver and live actors)
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    pipeline_s: float = 0.0  # actors ready -> last commit: the steady-state part of elapsed_s
    units_moved: int = 0  # queued units taken back from a busy actor for an idle one
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
            f"  retries: {self.unit_retries} unit retries, {self.actor_restarts} actor restarts, "
            f"{self.storage_retries} storage retries",
        ]
        if self.units_moved or self.backup_copies:
            out.append(
                f"  tail: {self.units_moved} units moved to idle actors, {self.backup_copies} "
                f"backup copies ({self.backup_wins} finished first)"
            )
        if self.error_codes:
            out.append(error_codes_line(self.error_codes))
        if self.message:
            out.append(f"  {self.message}")
        return out


@dataclass
class _Slot:
    index: int
    actor: object
    generation: int = 0
    retired: bool = False  # its engine cannot start there: no more attempts
    crashes: dict = field(default_factory=dict)  # generation -> keys in its engine at death


class Driver:
    """Runs one job to completion (or to a clean failure)."""

    def __init__(
        self, cfg: Config, progress_bar: bool | None = None, commit_threads: int = COMMIT_THREADS
    ):
        self.cfg = cfg
        self.progress_bar = progress_bar
        self.commit_threads = commit_threads
        self.input_storage = Storage.for_input(cfg)
        self.state = OutputState(cfg.output.path, Storage.for_output(cfg))
        # Commit markers by unit id: read at start, then this run's as they are written.
        self._records: dict[str, Marker] = {}
        self._reuse = None  # the ReuseIndex of reuse.outputs, built before any work
        self._columns = part_columns(cfg)  # data/ and errors/ columns, before lineage
        self._rows_before = self._errors_before = 0  # committed before this run (resume)
        self._placement: list[dict] = []  # where the actors run (pid, node, GPUs)
        self._live_timeline: list[tuple[float, int]] = []  # (seconds, actors live) on change
        self._units_by_actor: list[int] = []  # results each actor slot returned
        self._started_at = time.time()  # this run's start, wall clock (the report's axis)
        self._t0 = time.monotonic()
        self._unit_runs: list[dict] = []  # every hand-out: actor, unit, span, outcome
        self._actor_timeline: dict = {}  # each actor's busy / waiting / idle over the job

    # ---- before any work -------------------------------------------------------------
    def prepare(self) -> tuple[Plan, dict, set[str]]:
        """Plan the input and open the output ledger; raises before any work on problems."""
        plan = plan_job(self.cfg, self.input_storage)
        self._reuse = build_index(self.cfg, self.state.storage)
        fields = fingerprint_fields(self.cfg, plan.fingerprint)
        fp = fingerprint(fields)
        if self.cfg.output.mode == "overwrite":
            self.state.wipe()
            job = None
        else:
            job = self.state.check_resume(fp, fields)
        if job is None:
            job = {
                "job_id": f"{self.cfg.job.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
                f"-{uuid.uuid4().hex[:6]}",
                "fingerprint": fp,
                "fingerprint_fields": fields,
                "config": saved_config(self.cfg),
                "versions": versions(),
                "input": {"shards": len(plan.shards), "rows": plan.total_rows},
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
            try:
                self.state.write_json("_job.json", job)
            except OSError as exc:
                raise StorageError(f"output.path {self.state.url}: cannot write: {exc}") from None
            return plan, job, set()
        self._records = {m.unit_id: m for m in self.state.markers()}
        committed = set(self._records)
        if not self.state.success():
            removed = self.state.clean_orphans(list(self._records.values()))
            if removed:
                log.info("removed %d uncommitted part files of an interrupted run", len(removed))
        return plan, job, committed

    # ---- the run -------------------------------------------------------------------
    def run(self) -> JobSummary:
        t0 = self._t0 = time.monotonic()
        self._started_at = time.time()
        plan, job, committed = self.prepare()
        summary = JobSummary("running", Exit.OK, self.state.url, job["job_id"])
        summary.rows_total = plan.total_rows
        # The ledger is read once (prepare); what this run commits is added as it goes.
        if self.state.success():
            summary.status = "already_complete"
            summary.message = "output already complete (_SUCCESS present): nothing to do"
            self._fill_totals(summary)
            return summary
        done_before = sum(u.num_rows for u in plan.units() if u.unit_id in committed)
        # A resumed run judges its error fraction over every committed row, not only its own.
        before = totals_of(list(self._records.values()))
        self._rows_before, self._errors_before = before["rows"], before["error_rows"]
        todo: Iterator[WorkUnit] = (u for u in plan.units() if u.unit_id not in committed)
        progress = Progress(plan.total_rows, done_before, bar=self.progress_bar)
        try:
            padding, timings, actor_storage, failure = self._schedule(todo, job, summary, progress)
        finally:
            progress.close()
        summary.elapsed_s = time.monotonic() - t0
        summary.rows_per_s = summary.rows_this_run / summary.elapsed_s if summary.elapsed_s else 0
        try:
            return self._close(summary, job, padding, timings, actor_storage, failure)
        except StorageError as exc:  # committed units are safe; only the closing files failed
            summary.status, summary.exit_code = "failed", Exit.FAILED
            summary.message = f"closing files not written ({exc}); run again to finish"
            return summary

    def _close(self, summary, job, padding, timings, actor_storage, failure) -> JobSummary:
        """Totals, the error-fraction verdict, _metrics.json, the report, then _SUCCESS."""
        self._fill_totals(summary)

        def storage_stats() -> dict:
            here = merge_request_stats(
                self.input_storage.stats.snapshot(), self.state.storage.stats.snapshot()
            )
            return merge_request_stats(here, actor_storage)

        storage = storage_stats()
        summary.storage_retries = storage["retries"]
        failure = failure or error_fraction_problem(
            summary.error_rows, summary.rows_total, self.cfg.limits
        )
        metrics = {
            "job_id": job["job_id"],
            "summary": summary.__dict__,
            "padding": padding.as_dict(),
            "actor_peak_rss_mib": timings.pop("peak_rss_mib", None),
            "actor_timings_s": timings,
            "actors": self._placement,  # pid, node and GPUs of each actor as first started
            "actors_live": [[round(t, 2), n] for t, n in self._live_timeline],
            "units_by_actor": self._units_by_actor,  # results each actor slot returned
            "started_at": dt.datetime.fromtimestamp(self._started_at, dt.timezone.utc).isoformat(),
            "actor_timeline": self._actor_timeline,
            "unit_runs": self._unit_runs,
            "storage": storage,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        if failure:
            summary.status, summary.exit_code, summary.message = "failed", Exit.FAILED, failure
        else:
            summary.status = "succeeded"
        metrics["summary"] = summary.__dict__
        success = None if failure else {"job_id": job["job_id"], **metrics["summary"]}
        close_output(self.state, metrics, success)
        # The closing writes may have been retried too: the returned summary counts them.
        summary.storage_retries = storage_stats()["retries"]
        return summary

    def _fill_totals(self, summary: JobSummary) -> None:
        totals = totals_of(list(self._records.values()))
        summary.data_rows = totals["data_rows"]
        summary.error_rows = totals["error_rows"]
        summary.error_codes = totals["error_codes"]
        summary.units_total = totals["units"]

    def _schedule(self, todo, job, summary, progress):
        """Hand units to actors, commit results.

        Returns (padding, stage timings, actors' storage retries, failure message or None).
        """
        cfg = self.cfg
        pool = self._make_pool(job["job_id"])
        lineage: dict = {}  # filled when the first actor is ready (it names the engine)
        t_ready = t_start = time.monotonic()
        slots = [_Slot(i, a) for i, a in enumerate(pool.actors)]
        live = getattr(pool, "live", [True] * len(slots))
        # (seconds since the job started, actors live): the clock of unit_runs and the report
        self._live_timeline = [(t_start - self._t0, sum(live))]
        self._units_by_actor = [0] * len(slots)
        runs = Runs(len(slots))
        handout = HandOut(cfg.batching.units_in_flight_per_actor, cfg.batching.backup_copies)
        can_withdraw = hasattr(pool, "withdraw")  # the driver benchmark's pool cannot
        queue = UnitQueue(todo, cfg.limits.max_unit_attempts)
        isolation = CrashIsolation(cfg.limits.max_row_crashes)
        failure = None

        def requeue(unit: WorkUnit, attempt: int, reason: str) -> str | None:
            problem = queue.retry(unit, attempt, reason)
            summary.unit_retries = queue.retried
            if problem is None:
                log.warning(
                    "unit %s attempt %d failed (%s); retrying", unit.unit_id, attempt, reason
                )
            return problem

        def send(unit: WorkUnit, attempt: int, index: int, copy: bool = False) -> None:
            slot = slots[index]
            args = isolation.process_args(unit.unit_id)
            ref = slot.actor.process_unit.remote(unit, *args, **self._run_kwargs(unit))
            start = time.monotonic() - self._t0
            runs.add(ref, Run(unit, index, slot.generation, attempt, copy, start))

        def ended(run: Run, outcome: str) -> None:
            """One hand-out is over: on the report's per-actor timeline."""
            self._unit_runs.append(
                {
                    "actor": run.slot,
                    "unit_id": run.unit.unit_id,
                    "start_s": round(run.start_s, 3),
                    "end_s": round(time.monotonic() - self._t0, 3),
                    "outcome": outcome,
                    "copy": run.copy,
                }
            )

        def tail() -> None:
            """Nothing left to hand out: an idle actor takes a queued unit from a busy one,
            else (backup_copies) runs a copy of a running one (handout.py says why)."""
            for idle in HandOut.idle_slots(live, runs):
                while (ref := HandOut.to_move(runs, idle)) is not None:
                    run = runs.by_ref[ref]
                    if not pool.withdraw(run.slot, run.unit.unit_id):
                        run.started = True  # it began meanwhile: a copy may still help
                        continue
                    run.dropped = run.moved = True  # its call returns no result
                    log.info(
                        "unit %s moved from actor %d to idle actor %d",
                        run.unit.unit_id,
                        run.slot,
                        idle,
                    )
                    summary.units_moved += 1
                    send(run.unit, run.attempt, idle)
                    break
                else:
                    if (ref := handout.to_copy(runs, idle)) is not None:
                        run = runs.by_ref[ref]
                        log.info(
                            "backup copy of unit %s (running on actor %d) on idle actor %d",
                            run.unit.unit_id,
                            run.slot,
                            idle,
                        )
                        summary.backup_copies += 1
                        send(run.unit, run.attempt, idle, copy=True)

        committer = Committer(self.commit_threads, PENDING_COMMITS_PER_THREAD)

        def commit(run: Run, table) -> None:
            """The first complete result of a unit: to the committer, once; its twins are
            dropped (a second commit of a unit is refused here and by the ledger)."""
            unit = run.unit
            if unit.unit_id in runs.settled:
                raise RuntimeError(f"unit {unit.unit_id} would be committed twice")
            runs.settled.add(unit.unit_id)
            for twin in runs.twins(unit.unit_id):
                other = runs.by_ref[twin]
                other.dropped = True
                pool.drop(other.slot, unit.unit_id)
            if run.copy:
                summary.backup_wins += 1
            committer.submit(self._commit, unit, table, lineage, run.attempt, key=run)

        def book(fut: Future, run: Run) -> str | None:
            """Account for one finished commit; returns a failure message, if it is one."""
            unit, attempt = run.unit, run.attempt
            try:
                record, done = fut.result()
            except UnitIncomplete as exc:
                runs.settled.discard(unit.unit_id)
                return requeue(unit, attempt, str(exc))
            except StorageError as exc:  # retries exhausted: stop, keep the rest
                return f"cannot commit unit {unit.unit_id}: {exc}"
            isolation.forget(unit.unit_id)
            self._records[record.unit_id] = record
            summary.rows_this_run += done["num_rows"]
            summary.errors_this_run += done["error_rows"]
            summary.reused_this_run += done["reused_rows"]
            summary.units_this_run += 1
            progress.update(done["num_rows"], done["error_rows"])
            return self._error_check(summary)

        def restarted(reason: str) -> str | None:
            summary.actor_restarts += 1
            if summary.actor_restarts > cfg.limits.max_actor_restarts:
                return (
                    f"actors died {summary.actor_restarts} times, over "
                    f"limits.max_actor_restarts={cfg.limits.max_actor_restarts}; last: {reason}"
                )
            return None

        def know_engine() -> None:
            """Lineage for every row: known once an actor is ready (it names the engine)."""
            lineage.update(
                job_id=job["job_id"],
                model=cfg.engine.model,
                engine=pool.engine_name,
                engine_version=pool.engine_version,
                config_fingerprint=job["fingerprint"],
            )

        if pool.engine_name:  # a pool whose actors are ready from the start
            know_engine()

        def on_start(ref) -> str | None:
            """An actor's start ended: it joins, or its slot starts another (or gives up)."""
            nonlocal t_ready
            start = pool.started(ref)
            slot = slots[start.index]
            if start.ready:
                slot.actor = pool.actors[start.index]
                if not lineage:
                    t_ready = time.monotonic()
                    know_engine()
                return None
            if start.init_failed and pool.init_failures[start.index] >= START_ATTEMPTS:
                if not any(live):  # before any work: the job cannot run here
                    from .cluster import ClusterError  # the pool's module: Ray is loaded

                    raise ClusterError(f"engine failed to start: {start.error}")
                log.error(
                    "actor %d: engine failed to start twice (%s); going on without it",
                    start.index,
                    start.error,
                )
                slot.retired = True
                pool.retire(start.index)
                return None
            log.warning("actor %d did not start (%s)", start.index, start.error)
            slot.actor = pool.replace(start.index)
            slot.generation += 1
            return restarted(start.error or "start failed")

        def on_result(ref) -> str | None:
            """One hand-out came back: commit it, drop it (its twin is settled) or retry it."""
            run = runs.pop(ref)
            slot = slots[run.slot]
            outcome = pool.get(ref)
            # Another run of the unit settles it (committed, or still running elsewhere).
            elsewhere = run.unit.unit_id in runs.settled or bool(runs.twins(run.unit.unit_id))
            problem = None
            if outcome.actor_died:
                if slot.generation == run.generation:
                    slot.crashes[run.generation] = pool.crash_batch(slot.index)
                    slot.actor = pool.replace(slot.index)
                    slot.generation += 1
                    problem = restarted(outcome.error)
                crash = slot.crashes.get(run.generation)
                if crash is not None:  # rows that were inside: isolated from now on
                    isolation.learn(run.unit.unit_id, crash)
                ended(run, "discarded" if run.dropped else "failed")
                if problem or run.dropped or elsewhere:
                    pass
                elif crash is None:  # died outside the engine: an ordinary retry
                    problem = requeue(run.unit, run.attempt, outcome.error)
                else:  # an isolation step (or a bystander): no attempt is used up
                    queue.again(run.unit, run.attempt)
                    summary.unit_retries = queue.retried
            elif outcome.withdrawn:
                ended(run, "moved" if run.moved else "discarded")
            elif outcome.error:
                ended(run, "discarded" if run.dropped else "failed")
                if not (run.dropped or elsewhere):
                    problem = requeue(run.unit, run.attempt, outcome.error)
            elif run.dropped or run.unit.unit_id in runs.settled:
                ended(run, "discarded")  # its twin's result was first
            else:
                self._units_by_actor[slot.index] += 1
                ended(run, "committed")
                commit(run, outcome.table)
            return problem

        below_since: float | None = t_start  # since when fewer than min_actors are live
        try:
            while failure is None:
                now = time.monotonic()
                if sum(live) != self._live_timeline[-1][1]:
                    self._live_timeline.append((now - self._t0, sum(live)))
                    progress.actors(sum(live), len(slots))
                if sum(live) >= cfg.cluster.min_actors:
                    below_since = None
                elif below_since is None:
                    below_since = now  # lost actors: their replacements get the same time
                elif now - below_since > cfg.cluster.start_timeout_s:
                    failure = (
                        f"only {sum(live)} of {len(slots)} actors ready after "
                        f"cluster.start_timeout_s={cfg.cluster.start_timeout_s:g}s "
                        f"(cluster.min_actors={cfg.cluster.min_actors})"
                    )
                    break
                while (
                    not committer.full
                    and (index := handout.slot_for_next(live, runs)) is not None
                    and (item := queue.next()) is not None
                ):
                    send(*item, index)
                if queue.empty and can_withdraw:
                    tail()
                starting = pool.starting() if hasattr(pool, "starting") else []
                # Dropped runs (copies whose twin won) are not waited for at the end.
                if not runs.working() and not starting:
                    if not any(live):  # nothing live and nothing starting: every slot gave up
                        failure = "no actor could start (see the errors above)"
                        break
                    if queue.empty and not len(committer):
                        for ref in list(runs):
                            ended(runs.pop(ref), "discarded")
                        break
                    if len(committer):
                        failure = committer.settle(book, timeout=0.05)
                    else:
                        time.sleep(0.05)  # only backed-off retries left
                    continue
                waiting = 0.05 if len(committer) else 1.0
                for ref in pool.wait(list(runs) + starting, timeout=waiting):
                    failure = on_result(ref) if ref in runs.by_ref else on_start(ref)
                    if failure:
                        break
                failure = failure or committer.settle(book, timeout=0)
            # After a failure, results already handed to the committer are still written and
            # booked (the loop only ends without a failure once nothing is left to commit).
            problem = committer.drain(book)  # always: what was handed over is written
            failure = failure or problem
            summary.pipeline_s = time.monotonic() - t_ready
            self._placement = [p for p in getattr(pool, "placement", []) if p]
            padding, timings, storage = pool.collect_stats()
            self._actor_timeline = _job_timeline(
                getattr(pool, "timelines", []), self._started_at, [s.generation for s in slots]
            )
            return padding, timings, storage, failure
        finally:
            committer.shutdown()
            pool.shutdown()

    # ---- seams (retry-failed and the driver benchmark override them) -------------------
    def _make_pool(self, job_id: str):
        """The actors: a Ray ActorPool (the driver benchmark simulates one in-process)."""
        from .cluster import ActorPool

        return ActorPool(self.cfg, reuse=self._reuse, job_id=job_id)

    def _run_kwargs(self, unit: WorkUnit) -> dict:
        """Extra keyword arguments for the actor's ``process_unit`` call of ``unit``."""
        return {}

    def _commit(self, unit: WorkUnit, table, lineage: dict, attempt: int) -> tuple[Marker, dict]:
        """Write one unit's results; returns (its marker, what this run added)."""
        marker = commit_unit(
            self.state, unit, table, lineage, attempt, self._columns, self.cfg.output.compression
        )
        done = {"num_rows": marker.num_rows, "error_rows": marker.error_rows}
        return marker, {**done, "reused_rows": marker.reused_rows}

    def _error_check(self, summary: JobSummary) -> str | None:
        rows = self._rows_before + summary.rows_this_run
        errors = self._errors_before + summary.errors_this_run
        return error_fraction_problem(errors, rows, self.cfg.limits, running=True)


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
    return Driver(cfg, progress_bar).run()
