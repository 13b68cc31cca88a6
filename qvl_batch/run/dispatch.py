"""The run loop that ``run`` and ``retry-failed`` share: hand units to actors, take results
back, commit each unit once.

It composes the scheduler's parts: :class:`~qvl_batch.run.schedule.UnitQueue` (what is left, with
retries and backoff), :class:`~qvl_batch.run.handout.HandOut` + ``Runs`` (which actor gets what,
moves and backup copies at the tail), :class:`~qvl_batch.run.schedule.Committer` (the writing
threads), :class:`~qvl_batch.run.isolation.CrashIsolation` (rows suspected of killing an engine),
and the actor pool (``cluster.ActorPool``, or the driver benchmark's simulated one). What a unit
is and how it is committed comes from a :class:`Work` (a job's new rows, or retry-failed's error
rows); the loop itself does not know which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..output.lease import LeaseLost
from ..output.marker import Marker
from ..output.writer import UnitIncomplete
from ..rows.manifest import WorkUnit
from ..storage import StorageError
from .handout import HandOut, Run, Runs
from .isolation import CrashIsolation
from .liveness import beat_interval, silence_limit
from .progress import Progress
from .schedule import Committer, UnitQueue

if TYPE_CHECKING:  # the real pool's module loads Ray
    from ..engines.bucketing import PaddingStats
    from .cluster import Start
    from .handout import Outcome
    from .liveness import Beat

log = logging.getLogger("qvl_batch")

COMMIT_THREADS = 8  # default: units written at once (part files, then the marker)
# A slot whose engine constructor raised this many times in a row is a deterministic start
# failure (bad model path, missing package, out of memory at load), not bad luck.
START_ATTEMPTS = 2
PENDING_COMMITS_PER_THREAD = 4  # no new units are handed out past this many per thread


class Work(Protocol):
    """What the loop runs: how a unit is asked for, committed, and judged as results come."""

    def run_kwargs(self, unit: WorkUnit) -> dict:
        """Extra keyword arguments for the actor's ``process_unit`` call of ``unit``."""

    def commit(self, unit: WorkUnit, table, lineage: dict, attempt: int) -> tuple[Marker, dict]:
        """Write one unit's results; returns (its marker, num_rows/error_rows/reused_rows)."""

    def error_check(self, rows: int, errors: int) -> str | None:
        """A failure message once this run's rows so far should stop the job, else None."""


class Pool(Protocol):
    """The actors the loop runs units on (:class:`~qvl_batch.run.cluster.ActorPool`; the driver
    benchmark's simulated pool implements it in full)."""

    actors: list  # per slot: its actor now (``process_unit.remote`` runs a unit)
    live: list[bool]  # per slot: ready and not dead
    init_failures: list[int]  # per slot: failed starts in a row
    placement: list  # per slot: where its actor runs (node, GPUs), once known
    timelines: list[dict]  # the actors' busy / waiting / idle bins, after collect_stats
    engine_name: str | None  # known once the first actor is ready
    engine_version: str | None
    can_move: bool  # whether withdraw can take an unstarted unit back

    def starting(self) -> list:
        """``ready()`` refs of actors still starting."""

    def started(self, ref) -> Start:
        """The outcome of a finished start; a ready actor's slot becomes live."""

    def retire(self, index: int) -> None:
        """No more starts for this slot."""

    def replace(self, index: int):
        """A new actor in the slot (after a death); returns it."""

    def wait(self, refs: list, timeout: float) -> list:
        """The refs of ``refs`` done within ``timeout``."""

    def get(self, ref) -> Outcome:
        """A finished unit call's table, or its error."""

    def crash_batch(self, index: int) -> tuple[list | None, bool]:
        """(rows inside the slot's dead engine, whether it stalled)."""

    def health(self) -> dict[int, Beat] | None:
        """The last heartbeat per live slot (None: none could be read)."""

    def kill_silent(self, index: int, beat: Beat | None) -> None:
        """Kill the slot's actor from outside (its heartbeats stopped)."""

    def withdraw(self, index: int, unit_id: str) -> bool:
        """Take an unstarted unit back from the slot's actor; False if it started."""

    def drop(self, index: int, unit_id: str) -> None:
        """The slot's copy of a unit lost the race: let it end, unread."""

    def collect_stats(self) -> tuple[PaddingStats, dict[str, float], dict]:
        """Padding, timings and storage figures over the actors (fills ``timelines``)."""

    def shutdown(self) -> None:
        """Stop every actor."""


@dataclass
class _Slot:
    index: int
    actor: object
    generation: int = 0
    retired: bool = False  # its engine cannot start there: no more attempts
    # generation -> (keys in its engine at death, whether it stalled)
    crashes: dict = field(default_factory=dict)
    live_since: float = 0.0  # when its actor became ready (monotonic)
    killed: int = -1  # the generation the driver killed for silence (killed once)


@dataclass
class PassResult:
    """What the loop leaves for the job's metrics and report."""

    failure: str | None = None
    padding: Any = None  # PaddingStats
    timings: dict = field(default_factory=dict)  # actors' stage timings (seconds)
    storage: dict = field(default_factory=dict)  # actors' storage request stats
    placement: list[dict] = field(default_factory=list)  # pid, node, GPUs of each actor
    live_timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, actors live)
    units_by_actor: list[int] = field(default_factory=list)  # results each slot returned
    unit_runs: list[dict] = field(default_factory=list)  # every hand-out and how it ended
    timelines: list[dict] = field(default_factory=list)  # each actor's busy/waiting/idle bins
    generations: list[int] = field(default_factory=list)  # processes each slot went through


class Dispatcher:
    """One pass of units over one actor pool (``run``: every unit not yet committed;
    ``retry-failed``: the units with error rows). The pool is shut down when it ends."""

    def __init__(
        self,
        cfg,
        pool: Pool,
        work: Work,
        job: dict,
        summary,
        progress: Progress,
        records: dict[str, Marker],
        t0: float,
        commit_threads: int = COMMIT_THREADS,
    ):
        self.cfg, self.pool, self.work, self.job = cfg, pool, work, job
        self.summary, self.progress = summary, progress
        self.records = records  # this run's markers are added as they are written
        self.t0 = t0  # the job's clock (monotonic): unit_runs and actors_live count from it
        self.lineage: dict = {}  # filled when the first actor is ready (it names the engine)
        self.slots = [_Slot(i, a, live_since=time.monotonic()) for i, a in enumerate(pool.actors)]
        self.live = pool.live
        self.runs = Runs(len(self.slots))
        batching = cfg.batching
        self.handout = HandOut(batching.units_in_flight_per_actor, batching.backup_copies)
        self.isolation = CrashIsolation(cfg.limits.max_row_crashes)
        self.committer = Committer(commit_threads, PENDING_COMMITS_PER_THREAD)
        self.queue: UnitQueue | None = None
        self.out = PassResult(units_by_actor=[0] * len(self.slots))
        self.t_ready = time.monotonic()
        self._next_watch = 0.0  # when the actors' heartbeats are read next
        if pool.engine_name:  # a pool whose actors are ready from the start
            self._know_engine()

    # ---- one hand-out ---------------------------------------------------------------
    def _send(self, unit: WorkUnit, attempt: int, index: int, copy: bool = False) -> None:
        slot = self.slots[index]
        args = self.isolation.process_args(unit.unit_id)
        ref = slot.actor.process_unit.remote(unit, *args, **self.work.run_kwargs(unit))
        start = time.monotonic() - self.t0
        self.runs.add(ref, Run(unit, index, slot.generation, attempt, copy, start))

    def _ended(self, run: Run, outcome: str) -> None:
        """One hand-out is over: on the report's per-actor timeline."""
        self.out.unit_runs.append(
            {
                "actor": run.slot,
                "unit_id": run.unit.unit_id,
                "start_s": round(run.start_s, 3),
                "end_s": round(time.monotonic() - self.t0, 3),
                "outcome": outcome,
                "copy": run.copy,
            }
        )

    def _requeue(self, unit: WorkUnit, attempt: int, reason: str) -> str | None:
        problem = self.queue.retry(unit, attempt, reason)
        self.summary.unit_retries = self.queue.retried
        if problem is None:
            log.warning("unit %s attempt %d failed (%s); retrying", unit.unit_id, attempt, reason)
        return problem

    def _tail(self) -> None:
        """Nothing left to hand out: an idle actor takes a queued unit from a busy one, else
        (backup_copies) runs a copy of a running one (handout.py says why)."""
        runs = self.runs
        for idle in HandOut.idle_slots(self.live, runs):
            while (ref := HandOut.to_move(runs, idle)) is not None:
                run = runs.by_ref[ref]
                if not self.pool.withdraw(run.slot, run.unit.unit_id):
                    run.started = True  # it began meanwhile: a copy may still help
                    self.summary.moves_refused += 1
                    continue
                run.dropped = run.moved = True  # its call returns no result
                log.info(
                    "unit %s moved from actor %d to idle actor %d",
                    run.unit.unit_id,
                    run.slot,
                    idle,
                )
                self.summary.units_moved += 1
                self._send(run.unit, run.attempt, idle)
                break
            else:
                if (ref := self.handout.to_copy(runs, idle)) is not None:
                    run = runs.by_ref[ref]
                    log.info(
                        "backup copy of unit %s (running on actor %d) on idle actor %d",
                        run.unit.unit_id,
                        run.slot,
                        idle,
                    )
                    self.summary.backup_copies += 1
                    self._send(run.unit, run.attempt, idle, copy=True)

    # ---- commits --------------------------------------------------------------------
    def _commit(self, run: Run, table) -> None:
        """The first complete result of a unit: to the committer, once; its twins are dropped
        (a second commit of a unit is refused here and by the ledger)."""
        unit, runs = run.unit, self.runs
        if unit.unit_id in runs.settled:
            raise RuntimeError(f"unit {unit.unit_id} would be committed twice")
        runs.settled.add(unit.unit_id)
        for twin in runs.twins(unit.unit_id):
            other = runs.by_ref[twin]
            other.dropped = True
            self.pool.drop(other.slot, unit.unit_id)
        if run.copy:
            self.summary.backup_wins += 1
        self.committer.submit(self.work.commit, unit, table, self.lineage, run.attempt, key=run)

    def _book(self, fut: Future, run: Run) -> str | None:
        """Account for one finished commit; returns a failure message, if it is one."""
        unit, attempt, summary = run.unit, run.attempt, self.summary
        try:
            record, done = fut.result()
        except UnitIncomplete as exc:
            self.runs.settled.discard(unit.unit_id)
            return self._requeue(unit, attempt, str(exc))
        except StorageError as exc:  # retries exhausted: stop, keep the rest
            return f"cannot commit unit {unit.unit_id}: {exc}"
        except LeaseLost as exc:  # another driver owns the output now: commit nothing more
            return f"unit {unit.unit_id} not committed: {exc}"
        self.isolation.forget(unit.unit_id)
        self.records[record.unit_id] = record
        summary.rows_this_run += done["num_rows"]
        summary.errors_this_run += done["error_rows"]
        summary.reused_this_run += done["reused_rows"]
        summary.units_this_run += 1
        self.progress.update(done["num_rows"], done["error_rows"])
        return self.work.error_check(summary.rows_this_run, summary.errors_this_run)

    # ---- actors ---------------------------------------------------------------------
    def _restarted(self, reason: str) -> str | None:
        self.summary.actor_restarts += 1
        limit = self.cfg.limits.max_actor_restarts
        if self.summary.actor_restarts > limit:
            return (
                f"actors died {self.summary.actor_restarts} times, over "
                f"limits.max_actor_restarts={limit}; last: {reason}"
            )
        return None

    def _know_engine(self) -> None:
        """Lineage for every row: known once an actor is ready (it names the engine)."""
        self.lineage.update(
            job_id=self.job["job_id"],
            model=self.cfg.engine.model,
            engine=self.pool.engine_name,
            engine_version=self.pool.engine_version,
            config_fingerprint=self.job["fingerprint"],
        )

    def _on_start(self, ref) -> str | None:
        """An actor's start ended: it joins, or its slot starts another (or gives up)."""
        pool = self.pool
        start = pool.started(ref)
        slot = self.slots[start.index]
        if start.ready:
            slot.actor = pool.actors[start.index]
            slot.live_since = time.monotonic()
            if not self.lineage:
                self.t_ready = time.monotonic()
                self._know_engine()
            return None
        if start.init_failed and pool.init_failures[start.index] >= START_ATTEMPTS:
            if not any(self.live):  # before any work: the job cannot run here
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
        return self._restarted(start.error or "start failed")

    def _on_result(self, ref) -> str | None:
        """One hand-out came back: commit it, drop it (its twin is settled) or retry it."""
        runs = self.runs
        run = runs.pop(ref)
        slot = self.slots[run.slot]
        outcome = self.pool.get(ref)
        # Another run of the unit settles it (committed, or still running elsewhere).
        elsewhere = run.unit.unit_id in runs.settled or bool(runs.twins(run.unit.unit_id))
        problem = None
        if outcome.actor_died:
            if slot.generation == run.generation:
                crash, stalled = self.pool.crash_batch(slot.index)
                slot.crashes[run.generation] = (crash, stalled)
                self.summary.engine_stalls += stalled
                slot.actor = self.pool.replace(slot.index)
                slot.generation += 1
                problem = self._restarted("engine stalled" if stalled else outcome.error)
            crash, stalled = slot.crashes.get(run.generation, (None, False))
            if crash is not None:  # rows that were inside: isolated from now on
                self.isolation.learn(run.unit.unit_id, crash, stalled)
            self._ended(run, "discarded" if run.dropped else "failed")
            if problem or run.dropped or elsewhere:
                pass
            elif crash is None:  # died outside the engine: an ordinary retry
                problem = self._requeue(run.unit, run.attempt, outcome.error)
            else:  # an isolation step (or a bystander): no attempt is used up
                self.queue.again(run.unit, run.attempt)
                self.summary.unit_retries = self.queue.retried
        elif outcome.withdrawn:
            self._ended(run, "moved" if run.moved else "discarded")
        elif outcome.error:
            self._ended(run, "discarded" if run.dropped else "failed")
            if not (run.dropped or elsewhere):
                problem = self._requeue(run.unit, run.attempt, outcome.error)
        elif run.dropped or run.unit.unit_id in runs.settled:
            self._ended(run, "discarded")  # its twin's result was first
        else:
            self.out.units_by_actor[slot.index] += 1
            self._ended(run, "committed")
            self._commit(run, outcome.table)
        return problem

    # ---- liveness -------------------------------------------------------------------
    def _watch(self, now: float) -> None:
        """Every heartbeat interval: the actors' heartbeats move the progress line with rows
        finished inside running units; an actor holding work that sent none for
        :func:`~qvl_batch.run.liveness.silence_limit` is killed (liveness.py says why)."""
        stall_s = self.cfg.limits.stall_s
        if now < self._next_watch:
            return
        self._next_watch = now + beat_interval(stall_s)
        beats = self.pool.health()
        if beats is None:  # the recorder did not answer: judge nobody on missing beats
            return
        working = [s for s in self.slots if self.live[s.index] and self.runs.by_slot[s.index]]
        running = sum(beats[s.index].running_rows for s in working if s.index in beats)
        quiet = max((beats[s.index].quiet_s for s in working if s.index in beats), default=0.0)
        self.progress.running(running, quiet)
        for slot in working:
            beat = beats.get(slot.index)
            silent = beat.age_s if beat else now - slot.live_since
            if silent > silence_limit(stall_s) and slot.killed != slot.generation:
                slot.killed = slot.generation
                self.pool.kill_silent(slot.index, beat)

    # ---- the loop -------------------------------------------------------------------
    def _below_min_actors(self, now: float, below_since: float | None) -> tuple:
        """(since when fewer than min_actors are live, or None; a failure message or None)."""
        live, cluster = sum(self.live), self.cfg.cluster
        if live >= cluster.min_actors:
            return None, None
        if below_since is None:
            return now, None  # lost actors: their replacements get the same time
        if now - below_since > cluster.start_timeout_s:
            return below_since, (
                f"only {live} of {len(self.slots)} actors ready after "
                f"cluster.start_timeout_s={cluster.start_timeout_s:g}s "
                f"(cluster.min_actors={cluster.min_actors})"
            )
        return below_since, None

    def run(self, todo: Iterator[WorkUnit]) -> PassResult:
        """Run every unit of ``todo`` (or stop at a failure); the pool is shut down after."""
        pool, runs, committer, out = self.pool, self.runs, self.committer, self.out
        self.queue = queue = UnitQueue(todo, self.cfg.limits.max_unit_attempts)
        t_start = time.monotonic()
        out.live_timeline = [(t_start - self.t0, sum(self.live))]
        failure = None
        below_since: float | None = t_start
        try:
            while failure is None:
                now = time.monotonic()
                if sum(self.live) != out.live_timeline[-1][1]:
                    out.live_timeline.append((now - self.t0, sum(self.live)))
                    self.progress.actors(sum(self.live), len(self.slots))
                below_since, failure = self._below_min_actors(now, below_since)
                if failure:
                    break
                starting = pool.starting()
                while (
                    not committer.full
                    and (index := self.handout.slot_for_next(self.live, runs, bool(starting)))
                    is not None
                    and (item := queue.next()) is not None
                ):
                    self._send(*item, index)
                if queue.empty and pool.can_move:
                    self._tail()
                self._watch(now)
                # Dropped runs (copies whose twin won) are not waited for at the end.
                if not runs.working() and not starting:
                    if not any(self.live):  # nothing live or starting: every slot gave up
                        failure = "no actor could start (see the errors above)"
                        break
                    if queue.empty and not len(committer):
                        for ref in list(runs):
                            self._ended(runs.pop(ref), "discarded")
                        break
                    if len(committer):
                        failure = committer.settle(self._book, timeout=0.05)
                    else:
                        time.sleep(0.05)  # only backed-off retries left
                    continue
                waiting = 0.05 if len(committer) else 1.0
                for ref in pool.wait(list(runs) + starting, timeout=waiting):
                    failure = self._on_result(ref) if ref in runs.by_ref else self._on_start(ref)
                    if failure:
                        break
                failure = failure or committer.settle(self._book, timeout=0)
            # After a failure, results already handed to the committer are still written and
            # booked (the loop only ends without a failure once nothing is left to commit).
            problem = committer.drain(self._book)  # always: what was handed over is written
            out.failure = failure or problem
            self.summary.pipeline_s = time.monotonic() - self.t_ready
            out.placement = [p for p in pool.placement if p]
            out.padding, out.timings, out.storage = pool.collect_stats()
            out.timelines = pool.timelines
            out.generations = [s.generation for s in self.slots]
            return out
        finally:
            committer.shutdown()
            pool.shutdown()
