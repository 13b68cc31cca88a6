"""The hf engine in flight (``engine.hf.schedule: inflight``, issue #27): a stream engine.

``engine.hf.slots`` decode slots. One scheduler thread loops: once enough slots are free
(``min_group``), a group of waiting rows is prefilled (vision tower and text prefill, one
forward, left-padded) and joins the running batch (``running.py``); then the running batch takes
one decode step. A row leaves the moment it ends (EOS, ``max_tokens``, the model's positions, its
benchmark answer length): its result goes to the sink at once. Every model call runs on the hf
engine's model thread (``thread.py``). Positions are passed to the model explicitly: a prefill
gets Qwen2.5-VL's multimodal positions (``get_rope_index``); a decode step, each row's prompt's
largest position + 1 + the tokens it generated before (all three rope sections), as
``generate`` computes in transformers 4.57 and 5.x. So a row's answer does not depend on the
rows it runs with: greedy float32 equals the lock-step engine token for token
(``tests/engines/test_hf_inflight.py``). The running batch is a ``DynamicCache`` whose rows are
concatenated and compacted (``running.py``), or with ``engine.hf.inflight_cache: static`` slots
allocated once, a row keeping its slot for life (``slots.py``): a decode step of fixed shapes,
compiled under ``engine.hf.compile``. Design and what is left: docs/INFLIGHT.md.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ...config import Config
from ...errors import RowError
from .. import settings_of
from ..base import Engine, Request, Result, ResultSink
from ..bucketing import budget_tokens
from ..lengths import answer_length
from .engine import HFEngine
from .running import Row, RunningBatch
from .slots import SlotBatch, SlotsFull, decode_step, job_slots, slots_fit

log = logging.getLogger(__name__)

TRIES = 2  # a row failing alone is run again once before it is an ENGINE_ERROR
# Decode steps between reads of the chosen tokens back to the host (without guided decoding,
# whose grammars take each token as it comes). Reading waits for the device; ends by length are
# known on the host without it, only an EOS needs the tokens: a row that says EOS decodes on
# as a dead slot until the next read, at most READ_EVERY - 1 steps. Rows also are read back
# before a group joins and once none is decoding. To be tuned on a GPU (docs/INFLIGHT.md).
READ_EVERY = 8


class HFInflightEngine(Engine):
    """An :class:`HFEngine` (its model, inputs, tokens, model thread) run in flight."""

    def __init__(self, hf: HFEngine, cfg: Config):
        self.hf = hf
        self.name, self.version, self.guided = hf.name, hf.version, hf.guided
        hfs = settings_of(cfg, "hf")
        # compile: true, or null where it chose the compiled decode for this device (one CUDA
        # GPU): in flight, the static slots' step is compiled; generate's is never used (false,
        # as the bench sets for an eager run, holds even if the wrapped engine compiles)
        compiles = hfs.compile is not False and hf.compiled
        self.static = hfs.inflight_cache == "static" or (
            hfs.inflight_cache == "auto" and compiles and slots_fit(hf)
        )
        if hfs.compile and not self.static:
            fix = (
                "engine.hf.inflight_cache=auto or static"
                if slots_fit(hf)
                else "engine.hf.compile=null (this text model's sliding-window layers cannot "
                "take static slots)"
            )
            raise ValueError(
                "engine.hf.schedule=inflight: engine.hf.compile=true needs static slots "
                f"(the dynamic cache's decode is eager; docs/INFLIGHT.md); set {fix}"
            )
        compile_slots = self.static and compiles
        if hf.compiled:
            hf.set_modes(compile=False)
        self.sampling = cfg.sampling
        self.slots = hfs.slots or cfg.batching.max_batch_size
        self._bound = 2 * self.slots  # a row always waits to take a slot the moment one frees
        self.entry_group = max(1, self._bound // 8)
        # A group is prefilled once this many slots are free (or everything waiting fits): a
        # join copies the running cache, so rows join a few at a time, not one each step.
        self.min_group = max(1, self.slots // 8)
        # A join's prefill holds the group at once: the lock-step batches' token budget.
        self.max_batch_tokens = cfg.batching.max_tokens_per_batch
        # Rows that ended stay in the batch as dead slots (masked, their tokens ignored) until
        # this many are dead or a group joins: leaving copies the cache too.
        self.max_dead = self.slots // 4
        forward = inspect.signature(hf.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        rope = inspect.signature(hf.model.model.get_rope_index).parameters
        self._rope_types = "mm_token_type_ids" in rope  # transformers 5: needs the modality ids
        self._warpers = self._make_warpers()
        self._slot_batch: SlotBatch | None = None  # engine.hf.inflight_cache=static
        self._decode_step: Any = decode_step
        if self.static:
            penalty = self.sampling.repetition_penalty != 1.0
            tokens = hfs.inflight_tokens
            self._slot_batch = job_slots(hf, self.slots, tokens, penalty, compile_slots)
            if compile_slots:
                mode = "reduce-overhead" if hf.device.type == "cuda" else "default"
                self._decode_step = torch.compile(decode_step, mode=mode, dynamic=False)
        self._warn_growth = bool(hfs.inflight_tokens)  # 0: growing to the rows is the plan
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        # the model thread's, between steps (static: the slot batch while a row is in it)
        self._running: RunningBatch | SlotBatch | None = None
        self._started: Counter[str] = Counter()  # rows per unit taken from the queue, not out
        self._cohorts = 0  # cohorts put back by failed decode steps, so far
        self._closed = False
        self._sink: ResultSink | None = None
        self._loop_thread: threading.Thread | None = None
        # A joining group's host inputs (template, tokens, pixels) are made here while the
        # running rows decode, as the batching adapter prepares the next batch during this one.
        self._host = ThreadPoolExecutor(1, thread_name_prefix="hf-inflight-inputs")
        self._times = dict.fromkeys(("inputs", "vision", "prefill", "decode", "busy", "slot"), 0.0)
        self.steps = self.peak_active = self.reads = 0  # reads: waits for the chosen tokens

    # ---- the seam -----------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self._bound

    def start(self, sink: ResultSink) -> None:
        self._sink = sink
        self._loop_thread = threading.Thread(target=self._loop, name="hf-inflight", daemon=True)
        self._loop_thread.start()

    def submit(self, requests: list[Request]) -> None:
        assert self._sink is not None, "start() first"
        rows = []
        for req in requests:
            need = self.hf.count_text_tokens(req.prompt, req.system) + req.vision_tokens
            if need >= self.hf.max_positions:  # as the lock-step engine refuses it
                msg = f"prompt is {need} tokens; the model takes at most {self.hf.max_positions}"
                self._sink.put(Result(req.key, error_code=RowError.ENGINE_ERROR, error_message=msg))
            else:
                rows.append(Row(req, length=need))
        with self._cond:
            self._waiting.extend(rows)
            self._cond.notify_all()

    def take_back(self, unit_id: str) -> int | None:
        """The unit's rows still waiting for a slot, if none of its rows has started."""
        with self._cond:
            if self._started[unit_id]:
                return None
            kept = [row for row in self._waiting if row.req.key[0] != unit_id]
            back = len(self._waiting) - len(kept)
            self._waiting = deque(kept)
            return back

    def _put(self, result: Result) -> None:
        assert self._sink is not None
        with self._cond:
            self._started[result.key[0]] -= 1
            self._started += Counter()  # drops the units at zero
        self._sink.put(result)

    def warmup(self) -> None:
        """Throwaway rows in every slot (half join a step in) to the longest answers: kernels,
        allocator blocks, joins and compactions are paid before real work."""
        rows = [Row(req) for req in self.hf.warmup_requests(self.slots)]
        half = max(1, len(rows) // 2)
        lengths, self.hf.answer_lengths = self.hf.answer_lengths, ""
        try:
            for group in filter(None, (rows[:half], rows[half:])):
                host = self.hf.inputs.host_side([row.req for row in group])
                self.hf._thread.run(self._admit, group, host)
                if self._running is not None:
                    self.hf._thread.run(self._step)
            while self._running is not None:
                self.hf._thread.run(self._step)
        finally:
            self.hf.answer_lengths = lengths
            self._drop_running()
        self.reset_stage_times()

    def count_text_tokens(self, prompt: str, system: str | None) -> int:
        return self.hf.count_text_tokens(prompt, system)

    def modes(self) -> dict[str, Any]:
        decode = "compiled" if self._decode_step is not decode_step else "eager"
        return {
            **self.hf.modes(),
            "decode": decode,
            "schedule": "inflight",
            "slots": self.slots,
            "inflight_cache": "static" if self.static else "dynamic",
        }

    def stage_times(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._times.items()}

    def reset_stage_times(self) -> None:
        self._times = dict.fromkeys(self._times, 0.0)
        self.steps = self.peak_active = self.reads = 0

    def close(self) -> None:
        self._stop()
        self.hf.close()

    def _stop(self) -> None:
        """End the scheduler thread (the model stays loaded)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=30)
        self._host.shutdown(wait=False, cancel_futures=True)

    # ---- the scheduler thread -----------------------------------------------------------
    def _loop(self) -> None:
        sink = self._sink
        assert sink is not None
        # the group taken, its host inputs in the making: it joins at the first step they are
        # ready at (at once if nothing runs); no other group is taken meanwhile
        joining: tuple[list[Row], Future] | None = None
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._running or joining):
                        self._cond.wait()
                    if self._closed:
                        return
                    group = self._take() if joining is None else []
                    first = [row for row in group if not (row.tries or row.cohort)]
                    self._started.update(row.req.key[0] for row in first)
                t0 = time.perf_counter()
                if group:
                    sink.entering([row.req.key for row in group])
                    reqs = [row.req for row in group]
                    joining = group, self._host.submit(self.hf.inputs.host_side, reqs)
                if joining is not None and (joining[1].done() or self._running is None):
                    group, host = joining
                    joining = None
                    for result in self._admit_isolating(group, host):
                        self._put(result)
                if self._running is not None:
                    active = self._running.live
                    for result in self._step_isolating():
                        self._put(result)
                    seconds = time.perf_counter() - t0
                    self._times["busy"] += seconds
                    self._times["slot"] += seconds * active
                    self.steps += 1
                    self.peak_active = max(self.peak_active, active)
                sink.alive()
        except BaseException as exc:  # a bug: the actor dies and is replaced
            log.exception("hf in-flight scheduler died")
            sink.fail(exc)

    def _take(self) -> list[Row]:
        """The waiting rows that join now (under the lock), taken out of the queue. A cohort of
        rows put back by a failed decode step runs by itself, ``cap`` rows at a time, once
        nothing else runs."""
        running, head = self._running, self._waiting[0] if self._waiting else None
        if running is not None and any(row and not row.done and row.cohort for row in running.rows):
            return []  # a cohort runs: nothing joins it
        if head is not None and head.cohort:
            if running is not None:
                return []
            take = 0
            for row in self._waiting:
                if row.cohort != head.cohort or take == head.cap:
                    break
                take += 1
            return [self._waiting.popleft() for _ in range(take)]
        live = running.live if running else 0
        take = min(self.slots - live, len(self._waiting))
        if take < self.min_group and take < len(self._waiting) and live:
            return []  # wait for more free slots: a group at a time
        return self._nearest(take) if take else []

    def _nearest(self, take: int) -> list[Row]:
        """The oldest waiting row and up to ``take - 1`` more, nearest to it in length and
        within the token budget: a group of mixed photo sizes pads its prefill (and the slots'
        columns) to its longest row; the oldest always goes, so none waits for ever."""
        waiting = list(self._waiting)
        head = waiting[0].length
        order = sorted(range(len(waiting)), key=lambda i: (abs(waiting[i].length - head), i))
        chosen, budget = set(), 0
        for i in order:
            cost = budget_tokens(waiting[i].length, self.sampling.max_tokens)
            if len(chosen) == take or (chosen and budget + cost > self.max_batch_tokens):
                break
            chosen.add(i)
            budget += cost
        self._waiting = deque(row for i, row in enumerate(waiting) if i not in chosen)
        return [row for i, row in enumerate(waiting) if i in chosen]

    def _admit_isolating(self, group: list[Row], host: Future | None = None) -> list[Result]:
        """Prefill a group (``host``: its host inputs in the making) into the running batch; a
        group that raises is split in halves to isolate the rows that fail (as the batching
        adapter does)."""
        try:
            made = host.result() if host else self.hf.inputs.host_side([r.req for r in group])
            return self.hf._thread.run(self._admit, group, made)
        except Exception as exc:
            if len(group) > 1:
                mid = len(group) // 2
                return self._admit_isolating(group[:mid]) + self._admit_isolating(group[mid:])
            return self._retry_or_fail(group, exc)

    def _step_isolating(self) -> list[Result]:
        """One decode step. If it raises, its rows start again from their prefill: several as a
        cohort that runs by itself in halves (a row that poisons decode is cornered without
        condemning its neighbours); one alone at most :data:`TRIES` times, then an
        ENGINE_ERROR."""
        try:
            return self.hf._thread.run(self._step)
        except Exception as exc:
            batch = self._running
            rows = [row for row in batch.rows if row and not row.done] if batch else []
            self._drop_running()
            log.warning("hf in-flight: a decode step of %d rows failed", len(rows), exc_info=True)
            if len(rows) < 2:
                return self._retry_or_fail(rows, exc)
            self._cohorts += 1
            for row in rows:
                row.cohort, row.cap = self._cohorts, len(rows) // 2
                row.tokens, row.chosen = [], 0
            with self._cond:
                self._waiting.extendleft(reversed(rows))
            return []

    def _drop_running(self) -> None:
        """No batch runs any more (its rows are put back or done); the slots stay allocated."""
        self._running = None
        if self._slot_batch is not None:
            self._slot_batch.clear()

    def _retry_or_fail(self, rows: list[Row], exc: Exception) -> list[Result]:
        failed = []
        for row in rows:
            row.tries += 1
            if row.tries >= TRIES:
                msg = f"{type(exc).__name__}: {exc}"
                error = RowError.ENGINE_ERROR
                failed.append(Result(row.req.key, error_code=error, error_message=msg))
            else:
                row.tokens, row.chosen = [], 0
                with self._cond:
                    self._waiting.appendleft(row)
        return failed

    # ---- on the model thread ------------------------------------------------------------
    def _make_warpers(self) -> Any:
        import transformers

        s = self.sampling
        if s.temperature == 0:
            return None
        warpers: list[Any] = [transformers.TemperatureLogitsWarper(s.temperature)]
        if s.top_k:
            warpers.append(transformers.TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(s.top_p))
        torch.manual_seed(s.seed)  # once per engine: a row's sample depends on its neighbours
        return transformers.LogitsProcessorList(warpers)

    def _choose(
        self, logits: torch.Tensor, rows: list[Row], seen: torch.Tensor | None
    ) -> torch.Tensor:
        """The next token of each row from its last logits (float32, as generate does): the
        repetition penalty over the row's own tokens (``seen``: transformers' rule), then with
        guided decoding each row's grammar mask (before the warpers, as ``guided.py`` does in
        lock-step)."""
        logits = logits.float()
        if seen is not None:
            penalty = self.sampling.repetition_penalty
            score = logits.gather(1, seen)
            score = torch.where(score < 0, score * penalty, score / penalty)
            logits = logits.scatter(1, seen, score)
        guide = self.hf.guide
        if guide is not None:
            xgr = guide._xgr
            bitmask = xgr.allocate_token_bitmask(len(rows), guide.vocab_size)
            for i, row in enumerate(rows):
                if row is None or row.done or row.matcher.is_terminated():
                    bitmask[i].fill_(-1)
                else:
                    row.matcher.fill_next_token_bitmask(bitmask, i)
            on = logits.device.type if logits.device.type in ("cpu", "cuda") else "cpu"
            masked = logits.to(on)
            xgr.apply_token_bitmask_inplace(masked, bitmask.to(on), vocab_size=guide.vocab_size)
            logits = masked.to(logits.device)
        if self._warpers is None:
            return logits.argmax(-1)
        scores = self._warpers(None, logits)
        return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)

    def _admit(self, group: list[Row], host: Any) -> list[Result]:
        from transformers import DynamicCache

        hf = self.hf
        t0 = time.perf_counter()
        inputs = hf.inputs.device_side(host)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for row, n_prompt, n_vision in zip(
            group, mask.sum(1).tolist(), (ids == hf.image_token_id).sum(1).tolist()
        ):
            limit = max(1, min(self.sampling.max_tokens, hf.max_positions - n_prompt))
            drawn = answer_length(hf.answer_lengths, row.req.row_id) if hf.answer_lengths else 0
            row.prompt_tokens, row.vision_tokens = int(n_prompt), int(n_vision)
            row.end, row.ruled = (min(drawn, limit), drawn <= limit) if drawn else (limit, False)
            if hf.guide is not None:
                row.matcher = hf.guide._xgr.GrammarMatcher(hf.guide.compiled)
        rope = {"image_grid_thw": inputs["image_grid_thw"], "attention_mask": mask}
        if self._rope_types:
            rope["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        t1 = time.perf_counter()
        hf._clock.start()  # the vision tower's hooks mark its seconds inside the prefill
        with torch.inference_mode():
            positions, _ = hf.model.model.get_rope_index(ids, **rope)
            cache = DynamicCache()
            out = hf.model(
                **inputs,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
            seen = None
            if self.sampling.repetition_penalty != 1.0:  # padding: the row's last prompt token
                seen = torch.where(mask.bool(), ids, ids[:, -1:])
            first = self._choose(out.logits[:, -1], group, seen)
        hf._clock.stop()
        self._times["vision"] += hf._clock.split()["vision"]
        self._times["inputs"] += t1 - t0
        self._times["prefill"] += time.perf_counter() - t1
        # A decoded token's position: the prompt's largest + 1, then one more per token.
        nxt = positions.amax(dim=(0, 2)) + 1
        batch = RunningBatch(list(group), cache, mask.long(), nxt, first, pending=[first])
        for row in group:
            row.chosen = 1
        if seen is not None:
            batch.seen = torch.cat([seen, first[:, None]], dim=1)
        if self._slot_batch is not None:  # before any row's result is out
            try:
                self._fit_slots(batch)
            except SlotsFull as exc:
                return self._alone(batch, exc)
        results = self._read_back(batch)
        batch.compact()
        running = self._running
        if running is not None:  # the slots it frees are the group's
            results += self._read_back(running)
            running.compact()
            if running.empty:
                self._running = running = None
        if batch.rows and self._slot_batch is not None:
            self._join_slots(batch)
        elif batch.rows:
            if running is None:
                self._running = batch
            else:
                running.join(batch)
        return results

    def _step(self) -> list[Result]:
        batch = self._running
        assert batch is not None
        t0 = time.perf_counter()
        if isinstance(batch, SlotBatch):  # fixed shapes: the step may be compiled
            with torch.inference_mode():
                logits = batch.forward(self.hf.model, self._cache_kwarg, self._decode_step)
                tokens = self._choose(logits, batch.rows, batch.seen)
                batch.advance(tokens)
        else:
            n = len(batch.rows)
            mask = torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1)
            with torch.inference_mode():
                out = self.hf.model(
                    input_ids=batch.last[:, None],
                    attention_mask=mask,
                    position_ids=batch.pos.view(1, n, 1).expand(3, n, 1),
                    use_cache=True,
                    **{self._cache_kwarg: batch.cache},
                )
                tokens = self._choose(out.logits[:, -1], batch.rows, batch.seen)
            batch.mask, batch.pos, batch.last = mask, batch.pos + 1, tokens
            if batch.seen is not None:
                batch.seen = torch.cat([batch.seen, tokens[:, None]], dim=1)
        batch.pending.append(tokens)
        for row in batch.rows:
            if row is not None and not row.done and row.chosen < row.end:
                row.chosen += 1
        live = batch.live
        results = []
        if (
            self.hf.guide is not None  # each grammar takes its token before the next step
            or len(batch.pending) >= READ_EVERY
            or live == 0
            or batch.dead > self.max_dead
        ):
            results = self._read_back(batch)  # waits for the device
        if batch.empty:
            self._running = None
        self._times["decode"] += time.perf_counter() - t0
        return results

    def _read_back(self, batch: RunningBatch | SlotBatch) -> list[Result]:
        """The pending tokens to the host (one wait for the device): each row takes those
        chosen for it, up to an EOS or its end; a row that ends is a result and a dead slot
        until the batch compacts (more than ``max_dead`` of them, or none live; static slots:
        at once, freeing a slot copies nothing)."""
        if not batch.pending:
            return []
        steps = torch.stack(batch.pending, dim=1).tolist()  # (rows, steps)
        batch.pending = []
        self.reads += 1
        results = []
        for row, chosen in zip(batch.rows, steps):
            if row is None or row.done:
                continue
            for token in chosen[: row.chosen - len(row.tokens)]:
                row.tokens.append(token)
                guided = row.matcher is not None and not row.matcher.is_terminated()
                if guided and not row.matcher.accept_token(token):
                    raise RuntimeError(f"the JSON grammar refused token {token}")
                if token in self.hf.eos_ids:
                    row.done = True
                    results.append(self._result(row, "stop"))
                    break
                if len(row.tokens) >= row.end:
                    row.done = True
                    results.append(self._result(row, "stop" if row.ruled else "length"))
                    break
        if isinstance(batch, SlotBatch) or batch.live == 0 or batch.dead > self.max_dead:
            batch.compact()
        return results

    def _fit_slots(self, group: RunningBatch) -> None:
        """The slots grown for a group wider than them (``SlotBatch.room_for``; raises
        :class:`SlotsFull` past the caches' cap)."""
        slots = self._slot_batch
        assert slots is not None
        cap = self.hf.caches.cap_bytes
        self._slot_batch = grown = slots.room_for(group, cap, self._warn_growth)
        if self._running is slots:
            self._running = grown

    def _alone(self, group: RunningBatch, why: SlotsFull) -> list[Result]:
        """A group the static slots cannot hold within the caches' cap, decoded by itself on
        its own cache (the dynamic path, eager) while the slots' rows wait: answered, as it
        would be in lock-step, not failed."""
        log.warning("hf in flight: %d rows run by themselves (%s)", len(group.rows), why)
        results = self._read_back(group)
        group.compact()
        waiting, self._running = self._running, group if group.rows else None
        try:
            while self._running is not None:
                results += self._step()
        finally:
            self._running = waiting
        return results

    def _join_slots(self, group: RunningBatch) -> None:
        """A prefilled group into free slots (:meth:`_fit_slots` made room)."""
        assert self._slot_batch is not None
        self._slot_batch.join(group)
        self._running = self._slot_batch

    def _result(self, row: Row, reason: str) -> Result:
        return Result(
            row.req.key,
            text=self.hf.tokens.decode(row.tokens),
            finish_reason=reason,
            prompt_tokens=row.prompt_tokens,
            vision_tokens=row.vision_tokens,
            output_tokens=len(row.tokens),
        )


def make_inflight_engine(cfg: Config) -> HFInflightEngine:
    hf = HFEngine(cfg)  # loads the model
    try:
        return HFInflightEngine(hf, cfg)
    except Exception:
        hf.close()
        raise
