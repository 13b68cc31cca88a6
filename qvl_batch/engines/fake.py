"""A deterministic engine for planning, benchmarks and tests.

Output text is a function of the image content hash, the prompt and the seed only
(:func:`expected_text`), so tests can compute what every row must say. Two modes:

- ``batch`` (lock-step, through the batching adapter): a latency model per batch, per row and
  per decode step of the batch's longest answer stands in for a padded GPU engine.
- ``inflight``: an in-flight batching simulator (:class:`InflightSimulator`): ``slots``
  sequences decode together, each scheduler step costs ``step_s + step_per_active_s * active``
  seconds plus ``prefill_per_token_s`` per prompt token of the requests it admits, and a
  request waiting for a slot joins the moment one frees. Each row's answer length is drawn
  from its id (``answer_lengths``, :func:`qvl_batch.engines.lengths.answer_length`), so the
  engine pays for long-tailed answers as a real one does; its text stays
  :func:`expected_text`. ``feed`` says how the actor feeds it: ``stream`` (natively) or
  ``batch`` (one batch at a time through the batching adapter, each waiting for its longest
  answer: the old way).

Fault injection fails chosen rows, fails every batch that holds a chosen row (a failed row in
the in-flight mode), answers with broken JSON for chosen rows (structured output), SIGKILLs its
process on a chosen row, SIGSTOPs it on a chosen row (a wedged process), raises once after N
rows (batch mode), or SIGKILLs its own process after N rows, or holds a chosen row's batch for
``slow_s`` (a straggler or, long enough, a hang; optionally only in the first N engines that
meet it); ``load_s`` makes its construction take that long (start-up faults), and
``fail_load`` makes it raise (a deterministic start failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, check
from ..errors import ConfigError, RowError
from ..output.structured import example_for
from . import settings_of
from .base import BatchEngine, Engine, EngineError, Request, Result, ResultSink
from .lengths import answer_length, parse_lengths


@dataclass
class FakeEngineConfig:
    """The deterministic engine's latency model and fault injection (tests and benchmarks)."""

    batch_latency_s: float = 0.0
    row_latency_s: float = 0.0
    token_latency_s: float = 0.0  # per decode step (per output token of the longest row)
    fail_ids: list[str] = field(default_factory=list)  # rows that get ENGINE_ERROR
    raise_ids: list[str] = field(default_factory=list)  # any batch holding one of these raises
    crash_ids: list[str] = field(default_factory=list)  # ...SIGKILLs the actor process
    freeze_ids: list[str] = field(default_factory=list)  # ...SIGSTOPs it (see exit_incarnations)
    bad_json_ids: list[str] = field(default_factory=list)  # answers cut short (not JSON)
    raise_after_rows: int = 0  # raise once from generate() after this many rows (0 = never)
    exit_after_rows: int = 0  # SIGKILL the actor process after this many rows (0 = never)
    exit_incarnations: int = 1  # exit_after_rows, freeze_ids: only in incarnations below this
    load_s: float = 0.0  # seconds the engine takes to load (a window for start-up faults)
    # The constructor raises EngineError with this text after load_s: a deterministic start
    # failure, as a bad checkpoint gives ("" = never)
    fail_load: str = ""
    # ...per incarnation (actors ready at different times), load_s for those past the list
    load_s_by_incarnation: list[float] = field(default_factory=list)
    # A batch (or scheduler step) holding one of slow_ids first sleeps slow_s: a straggler. With
    # slow_times > 0, only the first slow_times engines to meet the row do (counted with marker
    # files in marker_dir, shared by every process), so a copy elsewhere runs at full speed.
    slow_ids: list[str] = field(default_factory=list)
    slow_s: float = 0.0
    slow_times: int = 0
    marker_dir: str = ""
    # "batch": lock-step with the latency model above. "inflight": an in-flight batching
    # simulator (slots; a step costs step_s + step_per_active_s x active, plus
    # prefill_per_token_s per prompt token admitted), each row's answer length drawn from
    # answer_lengths by its id.
    mode: str = "batch"
    feed: str = "stream"  # inflight: "stream" (native) or "batch" (through the batching adapter)
    slots: int = 64
    step_s: float = 0.01
    step_per_active_s: float = 0.0
    prefill_per_token_s: float = 0.0
    answer_lengths: str = "fixed:64"  # fixed:N | uniform:LO:HI | lognormal:MEAN:CAP
    max_in_flight: int = 0  # inflight + stream: rows inside at once; 0 = 2 x slots

    def __post_init__(self) -> None:
        check(self.mode in ("batch", "inflight"), "engine.fake.mode", "batch or inflight")
        check(self.feed in ("stream", "batch"), "engine.fake.feed", "stream or batch")
        check(self.slots >= 1, "engine.fake.slots", "must be >= 1")
        check(self.max_in_flight >= 0, "engine.fake.max_in_flight", "must be >= 0")
        check(
            self.slow_times == 0 or bool(self.marker_dir),
            "engine.fake.marker_dir",
            "is needed with slow_times > 0 (where the engines count their slow copies)",
        )
        check(
            min(self.step_s, self.step_per_active_s, self.prefill_per_token_s) >= 0,
            "engine.fake.step_s",
            "step and prefill costs must be >= 0",
        )
        try:
            parse_lengths(self.answer_lengths)
        except ValueError as exc:
            raise ConfigError(f"engine.fake.answer_lengths: {exc}") from None


ALIVE_EVERY_S = 0.1  # the batch engine's decode steps signal life this often (watchdog)

WORDS = (
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "tree",
    "sky",
    "river",
    "city",
    "street",
    "car",
    "person",
    "table",
    "window",
    "light",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "bright",
    "dark",
    "old",
    "new",
    "wooden",
    "stone",
    "field",
    "mountain",
    "beach",
    "food",
    "plate",
)


def expected_text(
    image_sha256: str, prompt: str, seed: int, max_tokens: int, schema: dict | None = None
) -> tuple[str, str]:
    """(text, finish_reason) the fake engine returns for this image, prompt and seed.

    With a structured-output ``schema`` the answer is a valid JSON instance of it (as guided
    decoding would give), drawn from the same digest.
    """
    digest = hashlib.sha256(f"{image_sha256}\0{prompt}\0{seed}".encode()).digest()
    if schema is not None:
        return json.dumps(example_for(schema, random.Random(digest))), "stop"
    wanted = 3 + digest[0] % 14  # 3..16 words
    n = min(wanted, max_tokens)
    words = [WORDS[b % len(WORDS)] for b in digest[1 : 1 + n]]
    return " ".join(words), ("stop" if wanted <= max_tokens else "length")


class _Faults:
    """The fault injection both modes share."""

    def __init__(self, cfg: Config, incarnation: int):
        self.fake = settings_of(cfg, "fake")
        loads = self.fake.load_s_by_incarnation
        load = loads[incarnation] if incarnation < len(loads) else self.fake.load_s
        if load > 0:  # every fake engine builds one: its "model load"
            time.sleep(load)
        if self.fake.fail_load:
            raise EngineError(self.fake.fail_load)
        self.incarnation = incarnation
        self.fail_ids = set(self.fake.fail_ids)
        self.raise_ids = set(self.fake.raise_ids)
        self.crash_ids = set(self.fake.crash_ids)
        self.freeze_ids = set(self.fake.freeze_ids)
        self.bad_json_ids = set(self.fake.bad_json_ids)
        self.slow_ids = set(self.fake.slow_ids)
        self.rows_seen = 0

    def entering(self, requests: list[Request]) -> None:
        """Rows start running: a poison row, or the N-th row, takes the process down."""
        self.rows_seen += len(requests)
        self.crash_check(requests)
        self.exit_check()
        self.slow_check(requests)

    def slow_check(self, requests: list[Request]) -> None:
        """A straggler: a slow row holds up its batch (or step) for ``slow_s``; with
        ``slow_times``, only the first that many engines anywhere that meet it."""
        for row_id in sorted({r.row_id for r in requests} & self.slow_ids):
            if self.fake.slow_times and not self._claim_slow(row_id):
                continue
            time.sleep(self.fake.slow_s)

    def _claim_slow(self, row_id: str) -> bool:
        safe = hashlib.sha256(row_id.encode()).hexdigest()[:16]
        for n in range(self.fake.slow_times):
            path = os.path.join(self.fake.marker_dir, f"slow-{safe}-{n}")
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                continue
        return False

    def crash_check(self, requests: list[Request]) -> None:
        if any(r.row_id in self.crash_ids for r in requests):
            os.kill(os.getpid(), signal.SIGKILL)  # a poison row that takes the process down
        frozen = any(r.row_id in self.freeze_ids for r in requests)
        if frozen and self.incarnation < self.fake.exit_incarnations:
            os.kill(os.getpid(), signal.SIGSTOP)  # a wedged process: every thread stops

    def exit_check(self) -> None:
        f = self.fake
        crash_due = f.exit_after_rows and self.rows_seen >= f.exit_after_rows
        if crash_due and self.incarnation < f.exit_incarnations:
            os.kill(os.getpid(), signal.SIGKILL)  # a real hard crash mid-batch


def _answer(cfg: Config, faults: _Faults, req: Request, output_tokens: int | None = None):
    """The fake answer of one row (or its injected failure)."""
    if req.row_id in faults.fail_ids or req.row_id in faults.raise_ids:
        return Result(
            req.key, error_code=RowError.ENGINE_ERROR, error_message="injected row failure"
        )
    s = cfg.sampling
    text, finish = expected_text(
        req.image_sha256, req.prompt, s.seed, s.max_tokens, cfg.structured.json_schema
    )
    if req.row_id in faults.bad_json_ids:
        text = text[: len(text) // 2]  # an answer cut short: not JSON
    return Result(
        req.key,
        text=text,
        finish_reason=finish,
        prompt_tokens=req.text_tokens + req.vision_tokens,
        vision_tokens=req.vision_tokens,
        output_tokens=len(text.split()) if output_tokens is None else output_tokens,
    )


class FakeEngine(BatchEngine):
    """Deterministic lock-step stand-in for a VLM with a latency model and fault injection."""

    name = "fake"
    version = "1"
    guided = True  # with a schema, every answer is a valid instance (bad_json_ids aside)

    def __init__(self, cfg: Config, incarnation: int = 0):
        self.cfg = cfg
        self.fake = settings_of(cfg, "fake")
        self.faults = _Faults(cfg, incarnation)
        self._raised = False

    @property
    def rows_seen(self) -> int:
        return self.faults.rows_seen

    def generate(self, requests: list[Request], prepared: Any = None) -> list[Result]:
        f = self.fake
        self.faults.rows_seen += len(requests)
        self.faults.crash_check(requests)
        if poison := sorted({r.row_id for r in requests} & self.faults.raise_ids):
            raise EngineError(f"injected batch failure (poison rows {poison})")
        self.faults.exit_check()
        if f.raise_after_rows and not self._raised and self.rows_seen >= f.raise_after_rows:
            self._raised = True
            raise EngineError(f"injected fault after {self.rows_seen} rows")
        self.faults.slow_check(requests)
        results = [_answer(self.cfg, self.faults, req) for req in requests]
        longest = max((r.output_tokens for r in results), default=0)
        delay = f.batch_latency_s + f.row_latency_s * len(requests)
        if delay > 0:
            time.sleep(delay)
        decode = f.token_latency_s * longest
        while decode > 0:  # decode steps, a sign of life at least every ALIVE_EVERY_S
            time.sleep(min(decode, ALIVE_EVERY_S))
            decode -= ALIVE_EVERY_S
            self.alive()
        return results


class InflightSimulator:
    """In-flight batching in real time: ``slots`` sequences decode together; a waiting request
    takes a slot the step after one frees. ``on_done(item)`` is called (from the scheduler
    thread) as each request's answer completes."""

    def __init__(self, fake: Any, on_done: Callable[[Any], None], on_admit=None):
        self.slots = fake.slots
        self.step_s = fake.step_s
        self.per_active_s = fake.step_per_active_s
        self.prefill_s = fake.prefill_per_token_s
        self._on_done = on_done
        self._on_admit = on_admit or (lambda items: None)
        self._cond = threading.Condition()
        self._waiting: deque = deque()  # (item, answer length, prompt tokens)
        self._active: list[list] = []  # [item, tokens still to decode]
        self._closed = False
        # Seconds the scheduler stepped, and slot-seconds (active sequences x step seconds).
        self.busy_s = 0.0
        self.slot_s = 0.0
        self.peak_active = 0
        self.peak_in_flight = 0  # waiting + active
        self._thread = threading.Thread(target=self._run, name="inflight-sim", daemon=True)
        self._thread.start()

    def add(self, item: Any, length: int, prompt_tokens: int) -> None:
        with self._cond:
            self._waiting.append((item, max(1, length), prompt_tokens))
            in_flight = len(self._waiting) + len(self._active)
            self.peak_in_flight = max(self.peak_in_flight, in_flight)
            self._cond.notify_all()

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._active)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        deadline = time.perf_counter()
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._active):
                    self._cond.wait()
                    deadline = time.perf_counter()
                if self._closed:
                    return
                admitted, prefill_tokens = [], 0
                while self._waiting and len(self._active) < self.slots:
                    item, length, tokens = self._waiting.popleft()
                    self._active.append([item, length])
                    admitted.append(item)
                    prefill_tokens += tokens
                active = len(self._active)
            if admitted:
                self._on_admit(admitted)
            step = self.step_s + self.per_active_s * active + self.prefill_s * prefill_tokens
            # Sleep to a deadline, so scheduling delays do not add up over thousands of steps.
            deadline = max(deadline + step, time.perf_counter() - 0.05)
            pause = deadline - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            done = []
            with self._cond:
                self.busy_s += step
                self.slot_s += step * active
                self.peak_active = max(self.peak_active, active)
                for seq in self._active:
                    seq[1] -= 1
                done = [seq[0] for seq in self._active if seq[1] <= 0]
                self._active = [seq for seq in self._active if seq[1] > 0]
            for item in done:
                self._on_done(item)

    def stage_times(self) -> dict[str, float]:
        with self._cond:
            return {"busy": round(self.busy_s, 4), "slot": round(self.slot_s, 4)}

    def reset(self) -> None:
        with self._cond:
            self.busy_s = self.slot_s = 0.0


class _Simulated:
    """An engine around an :class:`InflightSimulator` (``self.sim``): its clocks, its end."""

    sim: InflightSimulator

    def stage_times(self) -> dict[str, float]:
        return self.sim.stage_times()

    def reset_stage_times(self) -> None:
        self.sim.reset()

    def close(self) -> None:
        self.sim.close()


def _length(cfg: Config, req: Request) -> int:
    drawn = answer_length(settings_of(cfg, "fake").answer_lengths, req.row_id)
    return min(drawn, cfg.sampling.max_tokens)


class FakeInflightEngine(_Simulated, Engine):
    """The in-flight simulator fed as a stream (``engine.fake.mode=inflight``, feed stream)."""

    name = "fake"
    version = "1"
    guided = True

    def __init__(self, cfg: Config, incarnation: int = 0):
        self.cfg = cfg
        f = settings_of(cfg, "fake")
        # Twice the slots by default: a request always waits to take a slot the moment one
        # frees, as TensorRT-LLM's scheduler wants (see engine.trtllm.max_inflight_requests).
        self._bound = f.max_in_flight or 2 * f.slots
        self.entry_group = max(1, self._bound // 8)
        self.faults = _Faults(cfg, incarnation)
        self._sink: ResultSink | None = None
        self.sim = InflightSimulator(f, self._done, on_admit=self.faults.entering)

    @property
    def max_in_flight(self) -> int:
        return self._bound

    def start(self, sink: ResultSink) -> None:
        self._sink = sink

    def submit(self, requests: list[Request]) -> None:
        assert self._sink is not None, "start() first"
        self._sink.entering([r.key for r in requests])
        for r in requests:
            self.sim.add(r, _length(self.cfg, r), r.text_tokens + r.vision_tokens)

    def _done(self, req: Request) -> None:
        assert self._sink is not None
        self._sink.put(_answer(self.cfg, self.faults, req, _length(self.cfg, req)))


class FakeInflightBatchEngine(_Simulated, BatchEngine):
    """The same simulator fed one batch at a time (``feed=batch``): each ``generate`` submits
    its batch and waits for its longest answer, as a batch-synchronous runner does."""

    name = "fake"
    version = "1"
    guided = True

    def __init__(self, cfg: Config, incarnation: int = 0):
        self.cfg = cfg
        self.faults = _Faults(cfg, incarnation)
        self._cond = threading.Condition()
        self._finished: dict[tuple[str, int], Request] = {}
        self.sim = InflightSimulator(
            settings_of(cfg, "fake"), self._done, on_admit=self.faults.entering
        )

    def _done(self, req: Request) -> None:
        with self._cond:
            self._finished[req.key] = req
            self._cond.notify_all()

    def generate(self, requests: list[Request], prepared: Any = None) -> list[Result]:
        for r in requests:
            self.sim.add(r, _length(self.cfg, r), r.text_tokens + r.vision_tokens)
        keys = {r.key for r in requests}
        with self._cond:
            while not keys <= self._finished.keys():
                self._cond.wait()
            for k in keys:
                del self._finished[k]
        return [_answer(self.cfg, self.faults, r, _length(self.cfg, r)) for r in requests]


def make_fake_batch_engine(cfg: Config, incarnation: int = 0) -> BatchEngine:
    """The fake engine in lock-step: its batch mode, or the in-flight simulator fed by batch."""
    if settings_of(cfg, "fake").mode == "inflight":
        return FakeInflightBatchEngine(cfg, incarnation)
    return FakeEngine(cfg, incarnation)


def make_fake_engine(cfg: Config, incarnation: int = 0) -> Engine | BatchEngine:
    """The registry's builder: in-flight mode fed as a stream is a stream engine; otherwise a
    lock-step engine (batch mode, or the simulator fed batch by batch)."""
    fake = settings_of(cfg, "fake")
    if fake.mode == "inflight" and fake.feed == "stream":
        return FakeInflightEngine(cfg, incarnation=incarnation)
    return make_fake_batch_engine(cfg, incarnation)
