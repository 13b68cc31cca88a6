"""The per-GPU worker: read units, prepare images in a thread pool, bucket, feed the engine.

``process_unit`` is called concurrently for the units the driver keeps in flight on this actor
(a threaded Ray actor). All their rows meet in one bucketer, so batches form across the window;
one engine thread runs batches while the prepare pool decodes the next rows (overlap).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from .bucketing import Bucketer
from .config import Config
from .engines.base import Engine, Request, Result, make_engine
from .images import ImageError, prepare_image
from .manifest import WorkUnit
from .prompts import PromptError
from .reader import RowInput, fetch_uri, read_unit_table, unit_rows
from .reuse import ReuseIndex, ReuseReader, result_key, settings_digest
from .schema import IMAGE_COLUMNS, ROW_RESULT
from .storage import Storage
from .structured import PARSE_ERROR, OutputParser

log = logging.getLogger(__name__)

SINGLE_ROW_TRIES = 2  # a row alone in a failing call is retried once before it is an error
# The recorder answers in milliseconds; a stuck one must not hold the engine for long.
RECORD_TIMEOUT_S = 30


@dataclass
class _UnitCollector:
    """Results of one unit's rows as they come back, in input order."""

    results: list[Result | None]
    meta: list[dict | None]
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)

    def put(self, index: int, result: Result) -> None:
        if self.results[index] is not None:
            raise RuntimeError(f"row {index} answered twice")
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


class UnitWorker:
    """One engine, one prepare pool, one bucketer. Wrapped with ``ray.remote`` by the driver."""

    def __init__(
        self,
        cfg: Config,
        incarnation: int = 0,
        recorder=None,
        reuse: ReuseIndex | None = None,
    ):
        self.cfg = cfg
        self.incarnation = incarnation
        # The driver's FlightRecorder: told which rows are inside the engine before each call,
        # so if a row takes this process down the driver knows which rows to isolate.
        self._recorder = recorder
        self._solo: deque[Request] = deque()  # rows that must run alone (crash suspects)
        self.engine: Engine = make_engine(cfg, incarnation)
        self.storage = Storage.for_input(cfg)
        schema = cfg.structured.json_schema
        self._parser = OutputParser(schema) if schema is not None else None
        if self._parser and cfg.structured.guided == "required" and not self.engine.guided:
            raise RuntimeError(
                f"structured.guided=required, but the {self.engine.name} engine has no guided "
                "decoding here; use structured.guided=auto to parse free output instead"
            )
        self._settings = settings_digest(cfg)
        self._reuse = ReuseReader(reuse, Storage.for_output(cfg)) if reuse is not None else None
        threads = cfg.batching.prepare_threads or max(1, round(cfg.cluster.cpus_per_actor))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        b = cfg.batching
        self._max_prepared = b.window_batches * b.max_batch_size
        self._slots = threading.Semaphore(self._max_prepared)
        self._cond = threading.Condition()
        self._bucketer = Bucketer(
            b.max_batch_size,
            b.max_tokens_per_batch,
            b.max_wait_s,
            max_padding=b.max_padding_fraction,
        )
        # Rows of the units in flight not yet prepared: waiting for a slot or being prepared.
        self._unprepared = 0
        self._units: dict[str, _UnitCollector] = {}
        self._fatal: BaseException | None = None
        self._closed = False
        self.timings = {"read_s": 0.0, "prepare_s": 0.0, "engine_s": 0.0, "engine_idle_s": 0.0}
        self._warm_host()
        if cfg.engine.warmup:  # part of start-up, like loading the model: before ready()
            self._warmup()
        self._engine_thread = threading.Thread(target=self._engine_loop, daemon=True)
        self._engine_thread.start()

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
            "prepare_threads": self._pool._max_workers,
        }

    def stats(self) -> dict:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with self._cond:
            return {
                "padding": self._bucketer.stats.as_dict(),
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
        skip: Collection[int] = (),
        only: Collection[int] | None = None,
    ) -> pa.Table:
        """Run the rows of ``unit``; returns one ROW_RESULT row per row run, in input order.

        ``solo``: row indices that run in batches of one (they were in a batch when an actor
        died). ``skip``: rows that killed the engine process running alone; they are not run
        again and become ENGINE_CRASH rows. ``only``: run just these row indices (retry-failed).
        """
        solo, skip = set(solo), set(skip)
        t0 = time.perf_counter()
        table = read_unit_table(unit, self.cfg, self.storage)
        rows = unit_rows(unit, table, self.cfg)
        self.timings["read_s"] += time.perf_counter() - t0
        n = len(rows)
        if only is not None:
            wanted = set(only)
            rows = [r for r in rows if r.index in wanted]
        collector = _UnitCollector([None] * n, [None] * n, len(rows))
        if not rows:
            collector.done.set()
        with self._cond:
            self._units[unit.unit_id] = collector
        for row in rows:
            if row.index in skip and not row.error:
                row.error = ("ENGINE_CRASH", "the engine process died running this row alone")
        todo = sum(not row.error for row in rows)
        with self._cond:
            self._unprepared += todo  # the engine waits for these rather than run a part-batch
        try:
            for row in rows:
                if row.error:
                    code, message = row.error
                    key = (unit.unit_id, row.index)
                    with self._cond:
                        collector.put(
                            row.index, Result(key, error_code=code, error_message=message)
                        )
                    continue
                self._slots.acquire()
                self._pool.submit(self._prepare, unit.unit_id, row, row.index in solo)
                todo -= 1
            while not collector.done.wait(0.5):
                if self._fatal is not None:
                    raise RuntimeError(f"engine thread died: {self._fatal!r}")
        finally:
            with self._cond:
                self._unprepared -= todo  # rows never handed to the pool (an error above)
                self._units.pop(unit.unit_id, None)
                self._cond.notify_all()
        return self._result_table(unit, rows, collector, table)

    def _prepare(self, unit_id: str, row: RowInput, solo: bool = False) -> None:
        t0 = time.perf_counter()
        key = (unit_id, row.index)
        try:
            data = row.image
            if isinstance(data, str):
                data = fetch_uri(data, self.storage)
            digest = hashlib.sha256(data).hexdigest() if data else None
            rkey = digest and result_key(digest, self.cfg.prompt.system, row.prompt, self._settings)
            if rkey and self._reuse is not None and (found := self._reuse.find(rkey)):
                self._carry_over(key, rkey, *found)
                return
            text_tokens = self.engine.count_text_tokens(row.prompt, self.cfg.prompt.system)
            if text_tokens > self.cfg.prompt.max_prompt_tokens:
                raise PromptError(
                    "PROMPT_TOO_LONG",
                    f"prompt is {text_tokens} tokens; prompt.max_prompt_tokens is "
                    f"{self.cfg.prompt.max_prompt_tokens}",
                )
            img = prepare_image(data, self.cfg.image, digest)
        except (ImageError, PromptError) as exc:
            self._finish_early(key, Result(key, error_code=exc.code, error_message=exc.message))
            return
        except Exception as exc:  # a bug or an unexpected library error: still only this row
            msg = f"{type(exc).__name__}: {exc}"
            self._finish_early(key, Result(key, error_code="PREPARE_ERROR", error_message=msg))
            return
        finally:
            self.timings["prepare_s"] += time.perf_counter() - t0
        request = Request(
            key=key,
            row_id=row.row_id,
            prompt=row.prompt,
            system=self.cfg.prompt.system,
            image=img.image,
            image_sha256=img.sha256,
            vision_tokens=img.vision_tokens,
            text_tokens=text_tokens,
        )
        seq_len = img.vision_tokens + text_tokens
        budget = seq_len + self.cfg.sampling.max_tokens
        meta = {
            "image_width": img.original_size[0],
            "image_height": img.original_size[1],
            "resized_width": img.resized_size[0],
            "resized_height": img.resized_size[1],
            "image_sha256": img.sha256,
            "image_notes": ",".join(img.notes) or None,
            "result_key": rkey,
        }
        with self._cond:
            collector = self._units.get(unit_id)
            if collector is not None:
                collector.meta[row.index] = meta
            if solo:
                self._solo.append(request)
            else:
                key = img.resized_size if self.cfg.batching.bucketing else "arrival"
                self._bucketer.add(request, key, budget, seq_len)
            self._unprepared -= 1
            self._cond.notify_all()

    def _finish_early(self, key: tuple[str, int], result: Result, meta: dict | None = None):
        """A row done before the engine (an error, or reused): free its slot, record it."""
        self._slots.release()
        with self._cond:
            self._unprepared -= 1
            collector = self._units.get(key[0])
            if collector is not None:
                collector.meta[key[1]] = meta
                collector.put(key[1], result)
            self._cond.notify_all()

    def _carry_over(self, key: tuple[str, int], rkey: str, earlier: dict, job: str) -> None:
        """An earlier output has this row's result (same image, prompt and settings)."""
        columns = self._parser.columns.names if self._parser else []
        result = Result(
            key,
            text=earlier["text"],
            finish_reason=earlier["finish_reason"],
            prompt_tokens=earlier["prompt_tokens"],
            vision_tokens=earlier["vision_tokens"],
            output_tokens=earlier["output_tokens"],
            values={c: earlier.get(c) for c in columns} if columns else None,
            reused_from=earlier.get("reused_from") or job,  # the job that computed it
        )
        meta = {name: earlier.get(name) for name in IMAGE_COLUMNS}
        self._finish_early(key, result, {**meta, "result_key": rkey})

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            idle_since = time.perf_counter()
            while not self._closed:
                if self._solo:
                    self.timings["engine_idle_s"] += time.perf_counter() - idle_since
                    return [self._solo.popleft()]
                # No more rows can come before this batch (every row in flight is prepared, or
                # the window is full): flush partial buckets now instead of waiting out
                # max_wait_s. While rows are still being prepared, only a full batch goes.
                force = self._unprepared == 0 or self._bucketer.pending >= self._max_prepared
                batch = self._bucketer.next_batch(force=force)
                if batch:
                    self.timings["engine_idle_s"] += time.perf_counter() - idle_since
                    return batch
                due = self._bucketer.seconds_until_due()
                self._cond.wait(0.5 if due is None else min(0.5, max(due, 0.001)))
            return None

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
        if self._recorder is not None:  # "nothing inside", and wait for it as for a batch
            import ray

            try:
                ray.get(self._recorder.note.remote(self.incarnation, []), timeout=RECORD_TIMEOUT_S)
            except Exception as exc:
                log.warning("flight recorder unavailable: %s: %s", type(exc).__name__, exc)

    def _warmup(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine.warmup(self.cfg.batching.max_batch_size)
        except Exception as exc:  # a failed warm-up costs only the warm-up
            log.warning("engine warm-up failed: %s: %s", type(exc).__name__, exc)
        self.timings["warmup_s"] = time.perf_counter() - t0
        self.engine.reset_stage_times()

    def _engine_loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                t0 = time.perf_counter()
                results = self._generate_isolating(batch)
                self.timings["engine_s"] += time.perf_counter() - t0
                if self._parser is not None:
                    results = [self._parse(r) for r in results]
                self._slots.release(len(batch))
                with self._cond:
                    for result in results:
                        collector = self._units.get(result.key[0])
                        if collector is not None:
                            collector.put(result.key[1], result)
        except BaseException as exc:  # surface to every waiting process_unit call
            log.exception("engine thread died")
            self._fatal = exc

    def _generate_isolating(self, batch: list[Request], alone_tries: int = 0) -> list[Result]:
        """Run a batch; if the engine raises, split it to isolate the failing rows.

        A row is tried at most log2(batch size) + SINGLE_ROW_TRIES times; a row that fails on
        its own that often becomes an ENGINE_ERROR row, so a poison row never blocks its batch
        and a transient fault never condemns a row that happened to be alone.
        """
        try:
            self._record([r.key for r in batch])
            results = self.engine.generate(batch)
        except Exception as exc:
            self._record([])
            if len(batch) == 1:
                if alone_tries + 1 < SINGLE_ROW_TRIES:
                    return self._generate_isolating(batch, alone_tries + 1)
                msg = f"{type(exc).__name__}: {exc}"
                return [Result(batch[0].key, error_code="ENGINE_ERROR", error_message=msg)]
            mid = len(batch) // 2
            return self._generate_isolating(batch[:mid]) + self._generate_isolating(batch[mid:])
        self._record([])
        by_key = {r.key: r for r in results}
        out = []
        for req in batch:
            result = by_key.get(req.key)
            if result is None:
                result = Result(req.key, error_code="ENGINE_ERROR", error_message="no result")
            out.append(result)
        return out

    def _parse(self, result: Result) -> Result:
        """Structured output: typed values, or an OUTPUT_PARSE_ERROR row."""
        if result.error_code is None:
            result.values, problem = self._parser.parse(result.text, result.finish_reason)
            if problem:
                result.error_code, result.error_message = PARSE_ERROR, problem
        return result

    def _record(self, keys: list[tuple[str, int]]) -> None:
        """Tell the driver's recorder what is in the engine now (waits for entering rows)."""
        if self._recorder is None:
            return
        try:
            ref = self._recorder.note.remote(self.incarnation, keys)
            if keys:  # must be on record before a crash can happen; leaving needs no wait
                import ray

                ray.get(ref, timeout=RECORD_TIMEOUT_S)
        except Exception as exc:  # only crash isolation is lost for this batch, never its rows
            log.warning("flight recorder unavailable: %s: %s", type(exc).__name__, exc)

    def _result_table(
        self, unit: WorkUnit, rows: list[RowInput], collector: _UnitCollector, table: pa.Table
    ) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in ROW_RESULT.names}
        results = [collector.results[row.index] for row in rows]
        metas = [collector.meta[row.index] for row in rows]
        for row, result, meta in zip(rows, results, metas):
            assert result is not None
            meta = meta or {}
            ok = result.error_code is None
            cols["source_row"].append(unit.row_start + row.index)
            cols["id"].append(row.row_id)
            cols["ok"].append(ok)
            cols["text"].append(result.text)
            cols["finish_reason"].append(result.finish_reason)
            cols["prompt_tokens"].append(result.prompt_tokens if ok else None)
            cols["vision_tokens"].append(result.vision_tokens if ok else None)
            cols["output_tokens"].append(result.output_tokens if ok else None)
            for name in ("image_width", "image_height", "resized_width", "resized_height"):
                cols[name].append(meta.get(name))
            cols["image_sha256"].append(meta.get("image_sha256"))
            cols["image_notes"].append(meta.get("image_notes"))
            cols["result_key"].append(meta.get("result_key"))
            cols["reused_from"].append(result.reused_from)
            cols["error_code"].append(result.error_code)
            cols["error_message"].append(result.error_message)
        out = pa.table(cols, schema=ROW_RESULT)
        for f in self._parser.columns if self._parser else []:
            values = [r.values.get(f.name) if r.values else None for r in results]
            out = out.append_column(f, pa.array(values, type=f.type))
        indices = pa.array([row.index for row in rows], pa.int64())
        for name in self.cfg.input.passthrough_columns:
            out = out.append_column(table.schema.field(name), table.column(name).take(indices))
        return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._engine_thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
