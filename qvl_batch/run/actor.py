"""The per-GPU worker: read units, prepare images in a thread pool, feed the engine a stream.

``process_unit`` is called concurrently for the units the driver keeps in flight on this actor
(a threaded Ray actor). Their rows are prepared by a thread pool and wait, prepared, until one
feeding thread hands them to the engine, keeping ``engine.max_in_flight`` of them inside it;
results come back row by row as each finishes (any order) and go to their unit. What a batch is
is the engine's business (the batching adapter's, for lock-step engines).

Units take turns: a unit's rows go to the prepare pool only once every row of the units handed
out before it has, so the first unit finishes first and a later one is only read ahead (its
images decoded while the engine is busy). Such a unit has not started and the driver can move
it to an idle actor (:meth:`UnitWorker.withdraw`); a copy that lost the race to another actor
is withdrawn the same way (its rows still inside the engine are let run and dropped).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from ..config import Config
from ..engines.base import Engine, Request, Result
from ..engines.bucketing import PaddingStats
from ..engines.build import make_engine
from ..errors import RowError, RowFailure
from ..output.reuse import ReuseIndex
from ..output.schema import result_table
from ..output.structured import OutputParser
from ..rows.images import prepare_image
from ..rows.manifest import WorkUnit
from ..rows.prepare import ReusedRow, prepare_row
from ..rows.reader import RowInput, read_unit_table, unit_rows
from ..storage import Storage
from .carry_over import CarryOver
from .collector import UnitCollector
from .liveness import Watchdog, exit_dead, exit_stalled
from .recorder import RecorderClient, relay_logs
from .timeline import StateTimeline

log = logging.getLogger(__name__)

# Rows prepared ahead of the engine's bound, per prepare thread: enough that the engine finds
# rows waiting the moment a slot frees, few enough to keep decoded images in memory bounded.
PREPARED_AHEAD_PER_THREAD = 4


class EngineGone(RuntimeError):
    """The engine failed for good: this actor's process is on its way out."""


def _visible_gpus() -> list[str]:
    """The GPUs this process can see, as CUDA names them ("NVIDIA H100 80GB HBM3 GPU-5d1e..."),
    so a job's record shows each actor saw only its own; [] where no engine loaded torch."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [f"{p.name} GPU-{getattr(p, 'uuid', '?')}" for p in props]


class UnitWorker:
    """One engine, one prepare pool, one feeding thread. Wrapped with ``ray.remote`` by the
    driver. It is also the engine's result sink (``entering``, ``put``, ``fail``)."""

    def __init__(
        self,
        cfg: Config,
        incarnation: int = 0,
        recorder=None,
        reuse: ReuseIndex | None = None,
    ):
        self.cfg = cfg
        self.incarnation = incarnation
        # The driver's FlightRecorder: told which rows enter the engine (before they can run)
        # and which left, so if a row takes this process down the driver knows which to isolate.
        self._recorder = RecorderClient(recorder, incarnation)
        if not cfg.cluster.ray_logs:  # Ray forwards no worker output: send ours via the recorder
            relay_logs(recorder, incarnation)
        self.engine: Engine = make_engine(cfg, incarnation)
        self.storage = Storage.for_input(cfg)
        schema = cfg.structured.json_schema
        self._parser = OutputParser(schema) if schema is not None else None
        if self._parser and cfg.structured.guided == "required" and not self.engine.guided:
            raise RuntimeError(
                f"structured.guided=required, but the {self.engine.name} engine has no guided "
                "decoding here; use structured.guided=auto to parse free output instead"
            )
        columns = list(self._parser.columns.names) if self._parser else []
        self._carry = CarryOver(cfg, reuse, columns)
        threads = cfg.batching.prepare_threads or max(1, round(cfg.cluster.cpus_per_actor))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        self._bound = max(1, self.engine.max_in_flight)
        self._group = max(1, min(self.engine.entry_group, self._bound))
        # Rows between "handed to the prepare pool" and "result back": inside the engine, or
        # prepared and waiting for it, or being prepared.
        self._slots = threading.Semaphore(self._bound + PREPARED_AHEAD_PER_THREAD * threads)
        self._cond = threading.Condition()
        self._ready: deque[Request] = deque()  # prepared, waiting to enter the engine
        self._solo: deque[Request] = deque()  # crash suspects: each runs alone in the engine
        self._alone = False  # a suspect is inside: nothing else enters until it is back
        self._flushed = False  # the engine was told nothing more is coming
        self._in_engine = 0  # this actor's rows inside the engine
        self._left: list[tuple[str, int]] = []  # rows back since the last recorder note
        # Rows of the units in flight not yet prepared: waiting for a slot or being prepared.
        self._unprepared = 0
        self._units: dict[str, UnitCollector] = {}
        self._turns: deque[UnitCollector] = deque()  # units in hand-out order, rows not all out
        self._draining: dict[str, int] = {}  # withdrawn unit -> its rows still inside the engine
        self._fatal: BaseException | None = None
        self._closed = False
        self.timings = {"read_s": 0.0, "prepare_s": 0.0, "engine_s": 0.0, "engine_idle_s": 0.0}
        self._timing_lock = threading.Lock()  # read and prepare times come from many threads
        self._warm_host()
        if cfg.engine.warmup:  # part of start-up, like loading the model: before ready()
            self._warmup()
        self._since = time.perf_counter()  # last change of engine busy / idle (after warm-up)
        self.timeline = StateTimeline()  # busy / waiting for rows / idle, over wall time
        self._since_wall = self.timeline.origin
        self.engine.start(self)
        self._watchdog = Watchdog(
            cfg.limits.stall_s,
            inside=lambda: self._in_engine,
            running_rows=self._running_rows,
            on_stall=self._stalled,
            beat=self._recorder.beat if recorder is not None else None,
        )
        self._feeder = threading.Thread(target=self._feed_loop, name="feeder", daemon=True)
        self._feeder.start()
        self._watchdog.start()

    def ready(self) -> dict:
        """Identity of this worker, once the engine is loaded: its process, node and GPUs."""
        import ray

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "engine": self.engine.name,
            "engine_version": self.engine.version,
            "engine_modes": self.engine.modes(),
            "visible_gpus": _visible_gpus(),
            "prepare_threads": self._pool._max_workers,
            "max_in_flight": self._bound,
        }

    def stats(self) -> dict:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        padding = self.engine.padding() or PaddingStats().as_dict()
        with self._cond:
            self._clock_engine()
            return {
                "incarnation": self.incarnation,
                "timeline": self.timeline.snapshot(),
                "padding": padding,
                "timings": {
                    **self.timings,
                    **{f"engine_{k}_s": v for k, v in self.engine.stage_times().items()},
                },
                "storage": self.storage.stats.snapshot(),
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }

    def process_unit(
        self,
        unit: WorkUnit,
        solo: Collection[int] = (),
        skip: Mapping[int, str] | None = None,
        only: Collection[int] | None = None,
    ) -> pa.Table | None:
        """Run the rows of ``unit``; returns one ROW_RESULT row per row run, in input order,
        or None if the driver withdrew the unit meanwhile (:meth:`withdraw`).

        ``solo``: row indices that run alone in the engine (they were inside it when an actor
        died). ``skip``: rows that killed (ENGINE_CRASH) or stalled (ENGINE_STALL) the engine
        running alone, with that code; they are not run again. ``only``: run just these row
        indices (retry-failed).
        """
        try:
            return self._run_unit(unit, solo, skip, only)
        except EngineGone:
            # This process exits (exit_dead): the driver must see the actor die, the rows that
            # were inside on record as suspects, not a unit error that uses up an attempt.
            threading.Event().wait()
            raise

    def _run_unit(self, unit, solo, skip, only) -> pa.Table | None:
        table, rows, n = self._read(unit, dict(skip or {}), only)
        collector = UnitCollector([None] * n, [None] * n, len(rows))
        if not rows:
            collector.done.set()
        collector.unsent = todo = sum(not row.error for row in rows)
        with self._cond:
            # A withdrawn copy of this unit may still have rows inside the engine: results go
            # by unit id, so this call waits until they are back (and dropped).
            while unit.unit_id in self._units or self._draining.get(unit.unit_id):
                self._cond.wait(0.5)
            self._clock_engine()
            self._units[unit.unit_id] = collector
            self._turns.append(collector)
            self._unprepared += todo  # while any are, a lock-step engine waits to fill batches
        try:
            with self._cond:  # the units handed out before this one go first
                while self._turns[0] is not collector and not collector.withdrawn:
                    self._check_fatal()
                    self._cond.wait(0.5)
            self._hand_out(collector, unit.unit_id, rows, set(solo))
            self._end_turn(collector)
            while not collector.done.wait(0.5):
                self._check_fatal()
        finally:
            with self._cond:
                self._unprepared -= collector.unsent  # never handed out (withdrawn, an error)
                self._end_turn(collector)
                if self._units.get(unit.unit_id) is collector:
                    self._clock_engine()
                    del self._units[unit.unit_id]
                self._cond.notify_all()
        if collector.withdrawn:
            return None
        results = [collector.results[row.index] for row in rows]
        metas = [collector.meta[row.index] or {} for row in rows]
        fields = list(self._parser.columns) if self._parser else []
        passthrough = self.cfg.input.passthrough_columns
        return result_table(unit.row_start, rows, results, metas, fields, table, passthrough)

    def _read(
        self, unit: WorkUnit, skip: dict[int, str], only: Collection[int] | None
    ) -> tuple[pa.Table, list[RowInput], int]:
        """The unit's table, the rows to run (condemned ones as errors) and its row count."""
        t0 = time.perf_counter()
        table = read_unit_table(unit, self.cfg, self.storage)
        rows = unit_rows(unit, table, self.cfg)
        self._add_time("read_s", time.perf_counter() - t0)
        n = len(rows)
        if only is not None:
            wanted = set(only)
            rows = [r for r in rows if r.index in wanted]
        for row in rows:
            if row.index in skip and not row.error:
                code = RowError(skip[row.index])
                row.error = RowFailure(code, code.meaning)
        return table, rows, n

    def _hand_out(
        self, collector: UnitCollector, unit_id: str, rows: list[RowInput], solo: set[int]
    ) -> None:
        """Rows to the prepare pool as slots free (bad rows straight to their result)."""
        for row in rows:
            if collector.withdrawn:
                break
            if row.error:
                code, message = row.error.code, row.error.message
                with self._cond:
                    result = Result((unit_id, row.index), error_code=code, error_message=message)
                    collector.put(row.index, result)
                continue
            while not self._slots.acquire(timeout=0.5):
                self._check_fatal()
                if collector.withdrawn:
                    break
            else:
                self._pool.submit(self._prepare, collector, unit_id, row, row.index in solo)
                collector.unsent -= 1

    def _add_time(self, key: str, seconds: float) -> None:
        with self._timing_lock:
            self.timings[key] += seconds

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise EngineGone(f"engine died: {self._fatal!r}")

    def _end_turn(self, collector: UnitCollector) -> None:
        """Every row of ``collector``'s unit is out (or it ended): the next unit's turn."""
        with self._cond:
            if collector in self._turns:
                self._turns.remove(collector)
                self._cond.notify_all()

    def withdraw(self, unit_id: str, unstarted_only: bool = True) -> bool:
        """Take ``unit_id`` back: its ``process_unit`` call returns None at once, its rows not
        yet in the engine are dropped, those inside finish and are dropped. With
        ``unstarted_only``, only if none of its rows started computing (a move to an idle
        actor, nothing lost): rows read ahead, prepared or waiting in a lock-step engine's
        batching window are given back. True if withdrawn."""
        with self._cond:
            collector = self._units.get(unit_id)
            if collector is None or collector.done.is_set():
                return False
            if unstarted_only:
                if collector.started:
                    log.info("move of unit %s refused: its rows are computing", unit_id)
                    return False
                if collector.inside:
                    back = self.engine.take_back(unit_id)
                    if back is None:
                        log.info("move of unit %s refused: its rows are computing", unit_id)
                        return False
                    self._clock_engine()
                    self._in_engine -= back
                    collector.inside -= back
                    for _ in range(back):
                        self._slots.release()
            collector.withdrawn = True
            for queue in (self._ready, self._solo):
                kept = [r for r in queue if r.key[0] != unit_id]
                for _ in range(len(queue) - len(kept)):
                    self._slots.release()
                queue.clear()
                queue.extend(kept)
            if collector.inside:
                self._draining[unit_id] = collector.inside
            self._clock_engine()
            del self._units[unit_id]
            collector.done.set()
            self._cond.notify_all()
        log.info(
            "unit %s withdrawn (%d of its rows had entered the engine)", unit_id, collector.entered
        )
        return True

    def _prepare(
        self, collector: UnitCollector, unit_id: str, row: RowInput, solo: bool = False
    ) -> None:
        if collector.withdrawn:
            self._finish_early(collector, (unit_id, row.index), None)
            return
        t0 = time.perf_counter()
        key = (unit_id, row.index)
        try:
            prepared = prepare_row(
                row,
                self.cfg,
                self.storage,
                self.engine.count_text_tokens,
                self._carry.key_of,
                self._carry.find,
            )
        except RowFailure as exc:
            result = Result(key, error_code=exc.code, error_message=exc.message)
            self._finish_early(collector, key, result)
            return
        except Exception as exc:  # a bug or an unexpected library error: still only this row
            msg = f"{type(exc).__name__}: {exc}"
            result = Result(key, error_code=RowError.PREPARE_ERROR, error_message=msg)
            self._finish_early(collector, key, result)
            return
        finally:
            self._add_time("prepare_s", time.perf_counter() - t0)
        if isinstance(prepared, ReusedRow):  # an earlier output has this row's result
            self._finish_early(collector, key, *self._carry.result(key, prepared))
            return
        img = prepared.image
        request = Request(
            key=key,
            row_id=row.row_id,
            prompt=row.prompt,
            system=self.cfg.prompt.system,
            image=img.image,
            image_sha256=img.sha256,
            vision_tokens=img.vision_tokens,
            text_tokens=prepared.text_tokens,
        )
        meta = prepared.meta()
        with self._cond:
            self._unprepared -= 1
            if collector.withdrawn:  # taken back while this row was being prepared
                self._slots.release()
            else:
                collector.meta[row.index] = meta
                (self._solo if solo else self._ready).append(request)
            self._cond.notify_all()

    def _finish_early(
        self,
        collector: UnitCollector,
        key: tuple[str, int],
        result: Result | None,
        meta: dict | None = None,
    ):
        """A row done before the engine (an error, reused, or its unit withdrawn): free its
        slot, record it."""
        self._slots.release()
        with self._cond:
            self._unprepared -= 1
            if result is not None and not collector.withdrawn:
                collector.meta[key[1]] = meta
                collector.put(key[1], result)
            self._cond.notify_all()

    def _warm_host(self) -> None:
        """Pay the first unit's one-time costs at start-up, before ready(): the first call to
        the driver's recorder (actor-to-actor connection set-up, ~85 ms) and the image path's
        first use (Pillow's lazy plugin imports, ~20 ms). Measured in docs/PERFORMANCE.md."""
        import io

        from PIL import Image

        blob = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(blob, "JPEG")
        try:
            prepare_image(blob.getvalue(), self.cfg.image)
        except Exception as exc:  # only the warm-up is lost
            log.warning("image warm-up failed: %s: %s", type(exc).__name__, exc)
        self._recorder.warm()

    def _warmup(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine.warmup()
        except Exception as exc:  # a failed warm-up costs only the warm-up
            log.warning("engine warm-up failed: %s: %s", type(exc).__name__, exc)
        self.timings["warmup_s"] = time.perf_counter() - t0
        self.engine.reset_stage_times()

    # ---- feeding the engine (one thread) ------------------------------------------------
    def _next_group(self) -> list[Request] | None:
        """Under the lock: the rows to hand to the engine now, or None to wait.

        A crash suspect runs alone: once the engine is empty it goes in by itself, and nothing
        follows it until it is back. Otherwise rows enter while the engine holds fewer than its
        bound; once it holds half, in groups (the recorder's round trip is paid per group).
        """
        if self._alone:
            if self._in_engine:
                return None
            self._alone = False
        if self._solo:
            if self._in_engine:
                return None  # let the engine drain (flushed below) before the suspect enters
            self._alone = True
            return [self._solo.popleft()]
        free = self._bound - self._in_engine
        if free <= 0 or not self._ready:
            return None
        if (
            self._in_engine >= self._bound // 2
            and len(self._ready) < min(free, self._group)
            and self._unprepared > 0
        ):
            return None  # the engine has work; let a group gather
        return [self._ready.popleft() for _ in range(min(free, len(self._ready)))]

    def _feed_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    group = None
                    while not self._closed and self._fatal is None:
                        group = self._next_group()
                        if group is not None:
                            break
                        # Nothing more can come before what the engine holds is back: every row
                        # in flight is prepared and inside, or a suspect waits for it to drain.
                        drain = self._in_engine and (
                            self._solo or self._alone or (not self._ready and not self._unprepared)
                        )
                        if drain and not self._flushed:
                            self._flushed = True
                            break
                        self._cond.wait(0.5)
                    else:
                        return
                    if group is not None:
                        self._flushed = False
                        self._clock_engine()
                        self._watchdog.entered(self._in_engine)
                        self._in_engine += len(group)
                        for request in group:
                            if collector := self._units.get(request.key[0]):
                                collector.entered += 1
                                collector.inside += 1
                if group is None:
                    self.engine.flush()
                    continue
                self.engine.submit(group)
                if len(group) == 1 and self._alone:
                    self.engine.flush()
        except BaseException as exc:
            log.exception("feeding thread died")
            self.fail(exc)

    def _clock_engine(self) -> None:
        """Under the lock, before ``_in_engine`` or the units held change: time the engine
        busy or idle (and, on the timeline, idle waiting for rows or with no unit at all)."""
        now = time.perf_counter()
        self.timings["engine_s" if self._in_engine else "engine_idle_s"] += now - self._since
        self._since = now
        wall = time.time()
        state = "busy" if self._in_engine else "waiting" if self._units else "idle"
        self.timeline.add(state, self._since_wall, wall)
        self._since_wall = wall

    # ---- the engine's result sink -------------------------------------------------------
    def entering(self, keys: Sequence[tuple[str, int]]) -> None:
        """Rows about to run: on record with the driver before they can (rows back since the
        last note leave the record with it, so leaving costs no round trip of its own)."""
        with self._cond:
            for key in keys:
                if collector := self._units.get(key[0]):
                    collector.started += 1
        self._recorder.note(list(keys), self._take_left)

    def put(self, result: Result) -> None:
        """One row back from the engine (any thread)."""
        if self._parser is not None:
            result = self._parse(result)
        with self._cond:
            self._watchdog.progress()
            self._clock_engine()
            self._in_engine -= 1
            self._left.append(result.key)
            idle = self._in_engine == 0
            unit_id = result.key[0]
            if unit_id in self._draining:  # a row of a withdrawn unit: dropped
                self._draining[unit_id] -= 1
                if not self._draining[unit_id]:
                    del self._draining[unit_id]
            elif (collector := self._units.get(unit_id)) is not None:
                collector.inside -= 1
                collector.put(result.key[1], result)
            self._cond.notify_all()
        self._slots.release()
        if idle:  # nothing inside: clear the record without waiting for the next group
            self._recorder.note([], self._take_left)

    def _take_left(self) -> list[tuple[str, int]]:
        """The rows back since the last note (the recorder client calls it under its lock)."""
        with self._cond:
            left, self._left = self._left, []
        return left

    def alive(self) -> None:
        """A sign of life from the engine between results (a decode step)."""
        self._watchdog.progress()

    def fail(self, exc: BaseException) -> None:
        """The engine can run nothing more: this process exits so the driver replaces it and
        runs its units again (the rows inside stay on record as suspects)."""
        with self._cond:
            if self._fatal is not None:
                return
            self._fatal = exc
            self._cond.notify_all()
        log.error("engine died (%s: %s); this actor exits", type(exc).__name__, exc)
        threading.Thread(target=self._exit_dead, name="engine-dead", daemon=True).start()

    def _running_rows(self) -> int:
        """Rows with a result in the units this actor holds (not yet returned to the driver)."""
        with self._cond:
            return sum(c.answered for c in self._units.values())

    def _stalled(self, inside: int, quiet_s: float) -> None:
        """The watchdog's verdict: on record with the driver as a stall, then exit at once."""
        exit_stalled(inside, quiet_s, self.cfg.limits.stall_s, self._recorder, self._take_left)

    def _exit_dead(self) -> None:
        exit_dead(self.engine.close)

    def _parse(self, result: Result) -> Result:
        """Structured output: typed values, or an OUTPUT_PARSE_ERROR row."""
        if result.error_code is None:
            result.values, problem = self._parser.parse(result.text, result.finish_reason)
            if problem:
                result.error_code, result.error_message = RowError.OUTPUT_PARSE_ERROR, problem
        return result

    def close(self) -> None:
        self._watchdog.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._feeder.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
