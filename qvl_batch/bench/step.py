"""``qvl-batch bench step``: one decode step of the hf engine, lock-step against in flight, at
the same batch and cache length, and where its milliseconds go.

One loaded model (``--size``; dense vision, grouped decode attention, ``--decode``), B square
images. Lock-step runs them as one batch to ``--max-tokens`` (the engine's clock: decode seconds
over its steps). In flight, the same rows fill B static slots (``engine.hf.inflight_tokens``
columns) and the scheduler's pieces are run by hand, ``--steps`` times each: the whole step as
the scheduler calls it (a hop to the model thread, choose, advance, bookkeeping, a read back
every ``READ_EVERY`` steps), the same on the model thread, the compiled forward alone, the
forward waited for each time (the device's time of one), and the host's time to issue one.
``--profile``: torch.profiler over a lock-step batch (less a batch of one-token answers: its
decode steps' kernels) and over in-flight steps, kernels per step by name, and dynamo's and
inductor's counters (CUDA graph skips, graph breaks, recompiles). A kernel-level figure beside
``bench gpu``'s rows/s (docs/INFLIGHT.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import emit_json

TOP = 25  # kernels listed per profile
WARM_STEPS = 4  # in-flight steps run before timing (its graph replayed)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _per_step(fn, steps: int) -> float:
    """Milliseconds per call of ``fn`` over ``steps`` calls, the device waited for at the end."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return round((time.perf_counter() - t0) * 1000 / steps, 3)


def _median_synced(fn, steps: int) -> float:
    """Median milliseconds of ``fn`` with the device waited for after each call."""
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[len(times) // 2] * 1000, 3)


def _issue(fn, steps: int) -> float:
    """Milliseconds per call the host takes to issue ``fn`` (not waiting for the device)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    issued = time.perf_counter() - t0
    _sync()
    return round(issued * 1000 / steps, 3)


def profiled(fn):
    """(``fn()``'s result, torch.profiler's averages over it: CPU and, on CUDA, kernels). Started
    on the caller's thread (kineto's), recording every thread's ops (the model thread's)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    _sync()
    with profile(activities=activities) as prof:
        out = fn()
        _sync()
    return out, prof.key_averages()


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def kernels(averages) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches, device milliseconds) from a profile's averages."""
    from torch.autograd import DeviceType

    out = {}
    for event in averages:
        if getattr(event, "device_type", None) == DeviceType.CUDA:
            out[event.key] = (event.count, _device_us(event) / 1000)
    return out


def host_ops(averages, top: int = TOP) -> list[dict]:
    """The host's calls by their own CPU milliseconds: the CUDA runtime's from every thread
    (launches, graph launches, waits), ops only from the profiling thread (the model runs on
    another)."""
    from torch.autograd import DeviceType

    cpu = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CPU]
    cpu.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)}
        for e in cpu[:top]
    ]


def per_step(table: dict[str, tuple[int, float]], steps: int, less=None) -> dict:
    """Kernels per step (``less``: a profile's kernels taken off first, e.g. a one-token batch's
    prefill): launches and device ms a step in all, and the top kernels by time."""
    less = less or {}
    rows = []
    for name, (count, ms) in table.items():
        c0, m0 = less.get(name, (0, 0.0))
        if ms - m0 > 0:
            rows.append((name, (count - c0) / steps, (ms - m0) / steps))
    rows.sort(key=lambda r: r[2], reverse=True)
    return {
        "kernel_ms_per_step": round(sum(r[2] for r in rows), 3),
        "launches_per_step": round(sum(max(r[1], 0) for r in rows), 1),
        "top": [
            {"kernel": name[:120], "per_step": round(n, 2), "ms_per_step": round(ms, 4)}
            for name, n, ms in rows[:TOP]
        ],
    }


def compile_counters() -> dict:
    """Dynamo's and inductor's counters: CUDA graph skips, graph breaks, recompiles."""
    from torch._dynamo.utils import counters

    keep = ("inductor", "graph_break", "recompiles", "stats", "unimplemented")
    out = {}
    for group in keep:
        values = dict(counters.get(group, {}))
        if group == "inductor":
            values = {k: v for k, v in values.items() if "cudagraph" in k or "graph" in k}
        if values:
            out[group] = {str(k)[:200]: v for k, v in values.items()}
    return out


def lockstep_step(engine, requests: list, profile: bool) -> dict:
    """A batch of every request to the answer cap, after the warm-up (its shape compiled):
    decode milliseconds a step by the engine's clock; with ``profile`` its decode kernels."""
    engine.warmup(len(requests))
    engine.generate(requests)  # the shape's graph replayed once more before the timed batch
    engine.reset_stage_times()
    engine.generate(requests)
    last = engine.last_stages()
    steps = max(1, last["steps"] - 1)  # the first token is the prefill's
    out = {
        "rows": len(requests),
        "steps": last["steps"],
        "decode_ms_per_step": round(last["decode"] * 1000 / steps, 3),
        "prefill_s": round(last["prefill"], 3),
        "compiled_shapes": engine.modes()["compiled_shapes"],
    }
    if profile:
        _, full = profiled(lambda: engine.generate(requests))
        lengths = engine.answer_lengths
        engine.set_modes(answer_lengths="uniform:1:1")
        try:
            _, one = profiled(lambda: engine.generate(requests))
        finally:
            engine.set_modes(answer_lengths=lengths)
        out["profile"] = per_step(kernels(full), steps, less=kernels(one))
        out["profile"]["host_ops"] = host_ops(full)
    return out


def inflight_step(hf, cfg, requests: list, steps: int, profile: bool) -> dict:
    """The in-flight engine on ``hf``'s model with a slot for each request, every slot filled
    (answers to the cap: none leaves), its step's pieces timed ``steps`` times each."""
    import torch

    from ..engines.hf.running import Row
    from .inflight_engine import inflight_on

    engine = inflight_on(hf, cfg, len(requests))
    try:
        engine.warmup()
        run = hf._thread.run
        lengths, hf.answer_lengths = hf.answer_lengths, ""  # every row to the cap
        try:
            rows = [Row(r) for r in requests]
            run(engine._admit, rows, hf.inputs.host_side(requests))
            batch = engine._running
            assert batch is not None and batch.live == len(requests), "every slot filled"
            model, kwarg, step = hf.model, engine._cache_kwarg, engine._decode_step

            def forward():
                with torch.inference_mode():
                    return batch.forward(model, kwarg, step)

            def on_thread(fn):
                return lambda: run(_per_step, fn, steps)

            run(_per_step, engine._step, WARM_STEPS)  # the graph replayed before timing
            out = {
                "slots": len(requests),
                "length": batch.cache.length,
                "decode": engine.modes()["decode"],
                "step_ms": _per_step(lambda: run(engine._step), steps),
                "step_on_thread_ms": on_thread(engine._step)(),
                "forward_ms": on_thread(forward)(),
                "forward_synced_ms": run(_median_synced, forward, steps),
                "forward_issue_ms": run(_issue, forward, steps),
            }
            logits = run(forward)
            seen = batch.seen

            def choose():
                with torch.inference_mode():
                    return engine._choose(logits, batch.rows, seen)

            out["choose_ms"] = on_thread(choose)()
            if profile:

                def loop():
                    for _ in range(steps):
                        engine._step()

                _, averages = profiled(lambda: run(loop))
                out["profile"] = per_step(kernels(averages), steps)
                out["profile"]["host_ops"] = host_ops(averages)
            out["rows_live_after"] = batch.live
        finally:
            hf.answer_lengths = lengths
            engine._drop_running()
    finally:
        engine.close()
    return out


def bench_step(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..run.validate import load_job
    from .engine import Variant, _free, loaded_with_requests
    from .gpu import _ensure_model, job_overrides
    from .workload import dataset

    if WARM_STEPS + 3 * args.steps >= args.max_tokens:
        raise SystemExit(
            f"--steps {args.steps}: the in-flight rows would reach --max-tokens "
            f"{args.max_tokens} and leave while timed; give --max-tokens above "
            f"{WARM_STEPS + 3 * args.steps}"
        )
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    model = _ensure_model(args)
    side, b = args.image_size, args.batch_size
    work = Path(args.workdir)
    data = work / f"gpu-square-{b}-{side}"
    rows = dataset(data, [(side, side)] * b)
    variant = Variant("dense", args.decode, "grouped")
    extra = (
        *variant.overrides(),
        "engine.hf.inflight_cache=static",
        f"engine.hf.inflight_tokens={args.inflight_tokens}",
    )
    cfg = load_job(args.job, job_overrides(args, model, data, work / "step-out", b, cuda, extra))
    engine, requests, load_s, _ = loaded_with_requests(cfg, rows)
    report: dict = {
        "bench": "step",
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "size": args.size,
        "batch_size": b,
        "image_size": side,
        "max_tokens": args.max_tokens,
        "steps": args.steps,
        "load_s": round(load_s, 1),
    }
    try:
        variant.apply(engine)
        report["lockstep"] = lock = lockstep_step(engine, requests, args.profile)
        print(f"lock-step: {lock['decode_ms_per_step']} ms a decode step", flush=True)
        report["inflight"] = fly = inflight_step(engine, cfg, requests, args.steps, args.profile)
        print(
            f"in flight ({fly['slots']} x {fly['length']}): step {fly['step_ms']} ms "
            f"(on the model thread {fly['step_on_thread_ms']}), forward {fly['forward_ms']} "
            f"(waited each {fly['forward_synced_ms']}, issued {fly['forward_issue_ms']}), "
            f"choose {fly['choose_ms']}",
            flush=True,
        )
    finally:
        _free(engine)
    report["inflight_over_lockstep"] = round(fly["step_ms"] / lock["decode_ms_per_step"], 3)
    report["counters"] = compile_counters()
    for name in ("lockstep", "inflight"):
        prof = report[name].get("profile")
        if prof:
            print(
                f"{name}: kernels {prof['kernel_ms_per_step']} ms a step, "
                f"{prof['launches_per_step']} launches a step",
                flush=True,
            )
            for k in prof["top"][:12]:
                print(f"  {k['ms_per_step']:8.4f} ms {k['per_step']:6.1f}x  {k['kernel']}")
    print(f"counters: {report['counters']}", flush=True)
    emit_json(report, args.json_out)
    return 0


def add_step_bench(kinds, common) -> None:
    p = kinds.add_parser("step", help="one decode step, lock-step vs in flight, and its kernels")
    common(p)
    p.add_argument("--batch-size", type=int, default=128, help="rows = slots")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--inflight-tokens", type=int, default=640, help="engine.hf.inflight_tokens")
    p.add_argument("--steps", type=int, default=50, help="in-flight steps per measurement")
    p.add_argument("--model", default=None, help="model dir (built if it lacks config.json)")
    p.add_argument("--size", choices=("7b", "3b", "tiny"), default="7b", help="size to build")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prepare-threads", type=int, default=8)
    p.add_argument(
        "--decode", choices=("compiled", "eager"), default="compiled", help="engine.hf.compile"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler: kernels per step")
    p.add_argument("--json-out", default=None, help="also write the JSON line here")
    p.set_defaults(func=bench_step)
