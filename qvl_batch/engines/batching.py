"""The batching adapter: a lock-step engine (``generate(batch)``) as a stream.

Rows wait in size buckets (:mod:`qvl_batch.engines.bucketing`); one thread forms batches, one
runs them.
A batch goes when a bucket fills (rows or tokens), when topping it up with the nearest sizes
fills it within the padding limit, when its oldest row has waited ``batching.max_wait_s``, or as
a part-batch once nothing more can come before it: the actor said so (``flush``: every row in
flight is prepared and handed over) or the adapter holds its whole window. Bucketing pays here,
in padded engines; in-flight engines take the stream as it is.

The next batch is formed and its host work done (``BatchEngine.prepare``: template, tokens,
pixels) by a second thread while the current one runs, so the model waits for neither.

A batch that raises is split in halves to isolate the failing rows; a row is tried at most
log2(batch size) + ``SINGLE_ROW_TRIES`` times, and one that fails on its own that often becomes
an ENGINE_ERROR row, so a poison row never blocks its batch and a transient fault never condemns
a row that happened to be alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from ..config import Config
from ..errors import RowError
from .base import BatchEngine, Engine, Request, Result, ResultSink
from .bucketing import Bucketer, budget_tokens

log = logging.getLogger(__name__)

SINGLE_ROW_TRIES = 2  # a row alone in a failing call is retried once before it is an error


class BatchingAdapter(Engine):
    """Feeds a :class:`BatchEngine` from the stream, one bucketed batch at a time."""

    def __init__(self, engine: BatchEngine, cfg: Config):
        self.inner = engine
        self.name, self.version, self.guided = engine.name, engine.version, engine.guided
        b = cfg.batching
        self._batch_size = b.max_batch_size
        # The prepared window bucketing chooses from, in batches: wider fills more same-size
        # batches and holds more decoded images in memory.
        self._window = b.window_batches * b.max_batch_size
        self._by_size = b.bucketing
        self._max_tokens = cfg.sampling.max_tokens
        self._bucketer = Bucketer(
            b.max_batch_size,
            b.max_tokens_per_batch,
            b.max_wait_s,
            max_padding=b.max_padding_fraction,
        )
        self._cond = threading.Condition()
        self._flush = False
        self._closed = False
        self._sink: ResultSink | None = None
        self._threads: list[threading.Thread] = []
        self._run_s = 0.0  # seconds inside the engine's generate (the actor's engine_run_s)
        self._out: Counter[str] = Counter()  # rows per unit taken into a batch, not yet done
        self._ready: tuple[list[Request], Any] | None = None  # the next batch, prepared
        self._forming = True  # the prepare thread may still hand a batch over

    # ---- the seam -----------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self._window

    def start(self, sink: ResultSink) -> None:
        self._sink = sink
        self.inner.alive = sink.alive
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="batching-prepare", daemon=True),
            threading.Thread(target=self._run, name="batching", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, requests: list[Request]) -> None:
        with self._cond:
            for r in requests:
                seq_len = r.vision_tokens + r.text_tokens
                key = r.image.size if self._by_size else "arrival"
                self._bucketer.add(r, key, budget_tokens(seq_len, self._max_tokens), seq_len)
            self._flush = False
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def take_back(self, unit_id: str) -> int | None:
        with self._cond:
            if self._out[unit_id]:  # in the batch running or the one prepared next
                return None
            return len(self._bucketer.remove(lambda r: r.key[0] == unit_id))

    def warmup(self) -> None:
        self.inner.warmup(self._batch_size)

    def padding(self) -> dict:
        with self._cond:
            return self._bucketer.stats.as_dict()

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        return self.inner.count_text_tokens(prompt, system)

    def modes(self) -> dict:
        return self.inner.modes()

    def stage_times(self) -> dict[str, float]:
        return {"run": round(self._run_s, 4), **self.inner.stage_times()}

    def reset_stage_times(self) -> None:
        self._run_s = 0.0
        self.inner.reset_stage_times()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self.inner.close()

    # ---- the prepare thread: forms the next batch while one runs -----------------------------
    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while not self._closed:
                # The whole window held (rows waiting + rows in batches): nothing more can come.
                held = self._bucketer.pending + sum(self._out.values())
                force = self._flush or held >= self._window
                capped = self._bucketer.stats.token_capped
                batch = self._bucketer.next_batch(force=force)
                if batch:
                    if capped == 0 and self._bucketer.stats.token_capped:
                        self._warn_token_capped(batch)
                    self._out.update(r.key[0] for r in batch)
                    return batch
                due = self._bucketer.seconds_until_due()
                self._cond.wait(0.5 if due is None else min(0.5, max(due, 0.001)))
            return None

    def _warn_token_capped(self, batch: list[Request]) -> None:
        """Once per actor: the token budget, not the batch size, ends batches."""
        b = self._bucketer
        per_row = max(r.vision_tokens + r.text_tokens for r in batch) + self._max_tokens
        log.warning(
            "batching.max_tokens_per_batch=%d ended a batch at %d rows, short of "
            "batching.max_batch_size=%d (a row counts its vision and text tokens + "
            "sampling.max_tokens: up to %d here); raise the budget where the GPU has the memory "
            "(the report counts such batches)",
            b.max_tokens,
            len(batch),
            b.max_batch_size,
            per_row,
        )

    def _prepare_loop(self) -> None:
        assert self._sink is not None
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    prepared = self.inner.prepare(batch)
                except Exception:  # generate does it again, isolating the row that fails
                    log.warning("preparing a batch of %d rows failed", len(batch), exc_info=True)
                    prepared = None
                with self._cond:
                    self._ready = (batch, prepared)
                    self._cond.notify_all()
                    # One batch ahead at most: the next is formed once this one runs.
                    while self._ready is not None and not self._closed:
                        self._cond.wait()
        except BaseException as exc:  # a bug: the actor dies and is replaced
            log.exception("batching prepare thread died")
            self._sink.fail(exc)
        finally:
            with self._cond:
                self._forming = False
                self._cond.notify_all()

    # ---- the batch thread: runs prepared batches on the engine ------------------------------
    def _take_ready(self) -> tuple[list[Request], Any] | None:
        with self._cond:
            while self._ready is None and self._forming and not self._closed:
                self._cond.wait(0.5)
            ready, self._ready = self._ready, None
            self._cond.notify_all()
            return None if self._closed else ready

    def _run(self) -> None:
        assert self._sink is not None
        try:
            while (ready := self._take_ready()) is not None:
                batch, prepared = ready
                results = self._generate_isolating(batch, prepared=prepared)
                with self._cond:
                    self._out.subtract(r.key[0] for r in batch)
                    self._out += Counter()  # drops the units at zero
                    self._cond.notify_all()
                for result in results:
                    self._sink.put(result)
        except BaseException as exc:  # a bug: the actor dies and is replaced
            log.exception("batching thread died")
            self._sink.fail(exc)

    def _generate_isolating(
        self, batch: list[Request], alone_tries: int = 0, prepared: Any = None
    ) -> list[Result]:
        """Run a batch; if the engine raises, split it to isolate the failing rows (the halves
        are prepared again)."""
        assert self._sink is not None
        # Rows still inside from a failed larger batch stay on record with these (a crash now
        # blames the whole batch, as a crash in the first call would have).
        self._sink.entering([r.key for r in batch])
        t0 = time.perf_counter()
        try:
            results = self.inner.generate(batch, prepared)
        except Exception as exc:
            self._run_s += time.perf_counter() - t0
            if len(batch) == 1:
                if alone_tries + 1 < SINGLE_ROW_TRIES:
                    return self._generate_isolating(batch, alone_tries + 1)
                msg = f"{type(exc).__name__}: {exc}"
                return [Result(batch[0].key, error_code=RowError.ENGINE_ERROR, error_message=msg)]
            mid = len(batch) // 2
            return self._generate_isolating(batch[:mid]) + self._generate_isolating(batch[mid:])
        self._run_s += time.perf_counter() - t0
        by_key = {r.key: r for r in results}
        out = []
        for req in batch:
            result = by_key.get(req.key)
            if result is None:
                result = Result(
                    req.key, error_code=RowError.ENGINE_ERROR, error_message="no result"
                )
            out.append(result)
        return out
