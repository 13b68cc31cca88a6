"""The bare section's stream driver (``bench gpu --schedules inflight``): a stream engine alone.

Lock-step engines are timed batch by batch (``engine.time_batches``); an in-flight engine has
no batches, so it is fed as the actor feeds it, through the seam of ``engines/base.py``: every
prepared row submitted while fewer than ``max_in_flight`` are inside (in groups of at least
``entry_group``, as the actor hands them over), results counted from the sink as each row
leaves. Like ``bench feed``'s capacity loop, the engine is always full until the final drain,
so rows/s is what the engine can do with nothing around it. Occupancy is the engine's own
clock: occupied slot-seconds over the seconds it stepped, per slot.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from ..config import Config
from ..tooling.gpu_sampler import GpuSampler
from .floor import FLOOR_IMAGES_PER_S


class CountingSink:
    """What the actor would be to the engine, reduced to counting: rows inside, results, error
    codes (with each code's first message), answer tokens; the driver waits on it for room."""

    def __init__(self, stall_s: float, clocks=None):
        self.stall_s = stall_s  # no result nor sign of life for this long: the engine hangs
        self._clocks = clocks  # the engine's stage_times, read at each result (its thread)
        self.clock_at: list[tuple[float, dict]] = []  # (perf_counter, stage seconds) a result
        self._cond = threading.Condition()
        self.inside = self.results = self.answer_tokens = 0
        self.codes: Counter[str] = Counter()
        self.times: list[float] = []  # perf_counter of each result
        self.messages: dict[str, str] = {}
        self.failed: BaseException | None = None
        self._last_sign = time.monotonic()

    def entering(self, keys) -> None:
        self.alive()

    def put(self, result) -> None:
        with self._cond:
            self.inside -= 1
            self.results += 1
            self.times.append(time.perf_counter())
            if self._clocks is not None:
                self.clock_at.append((self.times[-1], self._clocks()))
            if result.error_code is not None:
                self.codes[result.error_code] += 1
                self.messages.setdefault(result.error_code, (result.error_message or "")[:500])
            else:
                self.answer_tokens += result.output_tokens or 0
            self._last_sign = time.monotonic()
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.failed = exc
            self._cond.notify_all()

    def alive(self) -> None:
        self._last_sign = time.monotonic()

    def submitting(self, n: int) -> None:
        with self._cond:  # before submit: a row refused at once is put inside submit
            self.inside += n

    def wait_until(self, at_most: int) -> None:
        """Until at most ``at_most`` rows are inside; raises if the engine failed or hangs."""
        with self._cond:
            while self.inside > at_most:
                if self.failed is not None:
                    raise RuntimeError(f"the engine failed: {self.failed!r}") from self.failed
                if time.monotonic() - self._last_sign > self.stall_s:
                    raise RuntimeError(f"no result for {self.stall_s:g}s: the engine hangs")
                self._cond.wait(1.0)


def time_stream(engine, requests: list, max_s: float, warm: bool, stall_s: float) -> dict:
    """The engine's warm-up (timed; unless ``warm`` is False), then every request through the
    seam (stops submitting after max_s, then drains): rows/s, tokens, errors, occupancy, the
    engine's stage seconds and peak memory."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:  # memory peaks count the warm-up, as the lock-step runs and the runner's do
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if warm:
        engine.warmup()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    engine.reset_stage_times()
    sink = CountingSink(stall_s, engine.stage_times)
    engine.start(sink)
    bound, group = engine.max_in_flight, max(1, engine.entry_group)
    sampler = GpuSampler() if cuda else None
    sampling = sampler.start() if sampler else False
    sent = 0
    start = time.time()
    t0 = time.perf_counter()
    try:
        while sent < len(requests):
            sink.wait_until(bound - min(group, len(requests) - sent))
            chunk = requests[sent : sent + bound - sink.inside]
            sink.submitting(len(chunk))
            engine.submit(chunk)
            sent += len(chunk)
            if max_s and time.perf_counter() - t0 >= max_s:
                break  # the device run is budgeted: time what fits
        last_in = time.perf_counter()
        sink.wait_until(0)
        secs = time.perf_counter() - t0
    finally:
        if sampler:
            sampler.stop()
    stages = engine.stage_times()
    slots = engine.slots
    busy = stages.get("busy", 0.0)
    done, errors = sink.results, sum(sink.codes.values())
    tokens = {
        "vision": sum(r.vision_tokens for r in requests[:sent]),
        "prompt": sum(r.text_tokens for r in requests[:sent]),
        "answer": sink.answer_tokens,
    }
    run = {
        "batch_size": slots,  # the slots decoding at once: compared with lock-step batches of B
        "slots": slots,
        "rows": done,
        "capped": sent < len(requests),
        "seconds": round(secs, 3),
        "images_per_s": round(done / secs, 3),
        "steady_images_per_s": steady_rate(sink.times, slots, last_in),
        "output_tokens_per_s": round(tokens["answer"] / secs, 1),
        "output_tokens_mean": round(tokens["answer"] / max(1, done - errors), 2),
        "errors": errors,
        "error_codes": dict(sorted(sink.codes.items())),
        "error_messages": sink.messages,
        "floor_fraction": round(done / secs / FLOOR_IMAGES_PER_S, 4),
        "tokens_per_row": {k: round(v / max(1, done), 2) for k, v in tokens.items()},
        # mean rows decoding while the engine stepped, and that over its slots
        "occupied_slots_mean": round(stages.get("slot", 0.0) / busy, 3) if busy else None,
        "occupancy": round(stages.get("slot", 0.0) / busy / slots, 4) if busy else None,
        "occupancy_steady": steady_occupancy(sink.clock_at, slots, last_in),
        "steps": engine.steps,
        "reads": engine.reads,  # waits for the device's chosen tokens (fewer than steps)
        "peak_active": engine.peak_active,
        "engine_s": stages,  # totals: an in-flight engine has no batches
        "engine_s_per_batch": {},
        "padding": {},
        "warmup_s": round(warmup_s, 3) if warm else None,
        **torch_peaks(),
    }
    if sampler is not None:
        run["gpu"] = sampler.summary(start, time.time()) if sampling else {"note": sampler.note}
    return run


def steady_rate(times: list[float], slots: int, last_in: float) -> float | None:
    """Rows/s of a long job's steady state: results from the ``slots``-th (the slots filled and
    turned over once) to the last submit (rows still waited for every slot that freed), so
    neither the fill, whose work comes out later, nor the final drain (slots emptying, the
    last answers alone) counts. None: fewer than ``slots`` results in that window."""
    if len(times) < slots:
        return None
    first = sorted(times)[slots - 1]
    n = sum(first < t <= last_in for t in times)
    return round(n / (last_in - first), 3) if n >= slots else None


def steady_occupancy(clock_at: list[tuple[float, dict]], slots: int, last_in: float):
    """Occupancy over :func:`steady_rate`'s window (the ``slots``-th result to the last submit):
    a long job's, without the fill and the final drain, whose emptying slots a short benchmark
    weighs far more than a job of thousands of rows. None: no such window."""
    inside = [stages for t, stages in clock_at if t <= last_in]
    if len(inside) <= slots:
        return None
    first, last = inside[slots - 1], inside[-1]
    busy = last.get("busy", 0.0) - first.get("busy", 0.0)
    slot = last.get("slot", 0.0) - first.get("slot", 0.0)
    return round(slot / busy / slots, 4) if busy > 0 else None


def torch_peaks() -> dict[str, int | None]:
    """torch's peak reserved and allocated CUDA memory since the last reset, MiB (None without
    CUDA): reserved also counts blocks cached by the runs before, allocated is what this run
    held at its peak."""
    import torch

    if not torch.cuda.is_available():
        return {"torch_max_reserved_mib": None, "torch_max_allocated_mib": None}
    return {
        "torch_max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20),
        "torch_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
    }


def bench_inflight(
    hf, cfg: Config, requests: list, slots: int, max_s: float, warm: bool = True
) -> dict:
    """The in-flight schedule with ``slots`` slots on the loaded lock-step engine ``hf`` (no
    second model load), timed by :func:`time_stream`; the model stays loaded."""
    from .inflight_engine import inflight_on

    engine = inflight_on(hf, cfg, slots)
    try:
        return time_stream(engine, requests, max_s, warm, cfg.limits.stall_s)
    finally:
        engine.close()


def stream_line(label: str, run: dict) -> str:
    """One printed line for an in-flight run."""
    busy = (run.get("gpu") or {}).get("busy_fraction_mean")
    reserved = run.get("torch_max_reserved_mib")
    return (
        f"{label} slots={run['slots']:<4} {run['images_per_s']:8.2f} images/s "
        f"{run['output_tokens_per_s']:9.1f} output tokens/s ({run['rows']} rows, "
        f"{run['seconds']:.1f}s{', capped' if run['capped'] else ''}); occupancy "
        f"{_num(run['occupancy'])} ({_num(run['occupied_slots_mean'])} of {run['slots']} slots; "
        f"steady {_num(run.get('occupancy_steady'))}), "
        f"{run['steps']} steps ({run['reads']} reads), errors {run['errors']}"
        + (f"; GPU busy {busy:.3f}" if busy is not None else "")
        + (f"; torch reserved {reserved / 1024:.1f} GiB" if reserved is not None else "")
    )


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"
