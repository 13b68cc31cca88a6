"""``qvl-batch bench feed``: feeding an in-flight batching engine as a stream vs batch by batch.

The engine is the fake engine's in-flight simulator (``engine.fake.mode=inflight``): ``--slots``
sequences decode together, each step costs ``--step-s + --step-per-active-s x active`` seconds
plus ``--prefill-per-token-s`` per prompt token admitted, and each row's answer length is drawn
from its id. For each answer-length distribution, side by side:

- ``capacity``: the engine alone, fed by a bare loop that hands it every row at once, so it is
  always full (no Ray, no reads, no commits): its saturated rows/s;
- ``stream``: the whole runner (a local Ray, real Parquet, images prepared, commits) feeding
  the engine as a stream (``feed=stream``: about twice the slots inside);
- ``batch-sync``: the same runner feeding the same engine one batch of ``--slots`` rows at a
  time through the batching adapter, each batch waiting for its longest answer (``feed=batch``):
  how the trtllm engine was fed before the stream.

Runner figures are rows over ``pipeline_s`` (actors ready -> last commit); the capacity figure is
rows over first submit -> last answer, so both include the start and the final drain. "occupied"
is the engine's mean number of running sequences over the seconds it stepped.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from ..run.validate import load_job
from .common import FAKE_ENGINE, job_io, tiny_rows

CAPTION_LENGTHS = "lognormal:110:300"  # caption-like: mean ~110 tokens, capped at 300


def _dataset(work: Path, rows: int, unit_rows: int) -> Path:
    return tiny_rows(work / f"feed-tiny-{rows}-u{unit_rows}", rows, 2, unit_rows)


def _engine_overrides(args: argparse.Namespace, lengths: str) -> list[str]:
    return [
        *FAKE_ENGINE,
        "engine.fake.mode=inflight",
        f"engine.fake.slots={args.slots}",
        f"engine.fake.step_s={args.step_s}",
        f"engine.fake.step_per_active_s={args.step_per_active_s}",
        f"engine.fake.prefill_per_token_s={args.prefill_per_token_s}",
        f"engine.fake.answer_lengths={lengths}",
        f"sampling.max_tokens={args.max_tokens}",
    ]


def capacity(args: argparse.Namespace, data: Path, lengths: str) -> dict:
    """The engine alone, every row handed over at once: always full until the final drain."""
    import pyarrow.dataset as ds

    from ..engines.base import estimate_text_tokens
    from ..engines.fake import InflightSimulator
    from ..engines.lengths import answer_length

    ids = ds.dataset(str(data)).to_table(columns=["id"]).column("id").to_pylist()
    cfg = load_job(args.job, _engine_overrides(args, lengths))
    prompt_tokens = estimate_text_tokens(cfg.prompt.template, cfg.prompt.system) + 4  # 56x56
    done = threading.Event()
    count = [0]

    def on_done(_item) -> None:
        count[0] += 1
        if count[0] == len(ids):
            done.set()

    sim = InflightSimulator(cfg.engine.fake, on_done)
    t0 = time.perf_counter()
    for row_id in ids:
        length = min(answer_length(lengths, row_id), cfg.sampling.max_tokens)
        sim.add(row_id, length, prompt_tokens)
    done.wait()
    seconds = time.perf_counter() - t0
    stages = sim.stage_times()
    sim.close()
    return {
        "rows": len(ids),
        "seconds": round(seconds, 3),
        "rows_per_s": len(ids) / seconds,
        "occupied": stages["slot"] / stages["busy"] if stages["busy"] else 0.0,
    }


def runner(args: argparse.Namespace, data: Path, lengths: str, feed: str) -> dict:
    """The whole runner on a local Ray it starts itself, with the simulator fed by ``feed``."""
    from ..run.driver import run_job

    out = Path(args.workdir) / f"feed-out-{feed}"
    overrides = [
        *job_io(data, out),
        *_engine_overrides(args, lengths),
        f"engine.fake.feed={feed}",
        f"batching.max_batch_size={args.slots}",  # batch-sync: one engine-full batch at a time
        f"batching.unit_rows={args.unit_rows}",
        "cluster.address=null",
        f"cluster.local_num_cpus={args.cores}",
        f"cluster.num_actors={args.actors}",
        *args.overrides,
    ]
    summary = run_job(load_job(args.job, overrides), progress_bar=False)
    metrics = json.loads((out / "_metrics.json").read_text())
    timings = metrics.get("actor_timings_s") or {}
    busy, slot = timings.get("engine_busy_s", 0.0), timings.get("engine_slot_s", 0.0)
    pipe = summary.pipeline_s
    return {
        "status": summary.status,
        "rows": summary.rows_this_run,
        "error_rows": summary.errors_this_run,
        "pipeline_s": round(pipe, 3),
        "rows_per_s": summary.rows_this_run / pipe if pipe > 0 else 0.0,
        "occupied": slot / busy if busy else 0.0,
    }


def bench_feed(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = _dataset(work, args.rows, args.unit_rows)
    full_step = args.step_s + args.step_per_active_s * args.slots
    print(
        f"feed: {args.rows} rows in units of {args.unit_rows}, {args.actors} actor(s); simulated "
        f"in-flight engine: {args.slots} slots, step {args.step_s * 1e3:g} ms + "
        f"{args.step_per_active_s * 1e3:g} ms/active ({full_step * 1e3:.2f} ms full), prefill "
        f"{args.prefill_per_token_s * 1e6:g} us/token, max_tokens {args.max_tokens}",
        flush=True,
    )
    report: dict = {"bench": "feed", "args": {k: v for k, v in vars(args).items() if k != "func"}}
    report["runs"] = {}
    for lengths in args.lengths:
        cap = capacity(args, data, lengths)
        stream = runner(args, data, lengths, "stream")
        sync = runner(args, data, lengths, "batch")
        run = {
            "capacity": cap,
            "stream": stream,
            "batch_sync": sync,
            "stream_vs_capacity": stream["rows_per_s"] / cap["rows_per_s"],
            "stream_vs_batch_sync": stream["rows_per_s"] / sync["rows_per_s"]
            if sync["rows_per_s"]
            else None,
            "batch_sync_vs_capacity": sync["rows_per_s"] / cap["rows_per_s"],
        }
        report["runs"][lengths] = run
        print(f"\nanswer lengths {lengths}:")
        print(f"  {'feeding':<12} {'rows/s':>8} {'occupied':>9} {'of capacity':>12}")
        for name, r in (("capacity", cap), ("stream", stream), ("batch-sync", sync)):
            share = r["rows_per_s"] / cap["rows_per_s"]
            print(f"  {name:<12} {r['rows_per_s']:8.2f} {r['occupied']:9.1f} {share:12.3f}")
        ratio = run["stream_vs_batch_sync"]
        print(f"  stream vs batch-sync: {'-' if ratio is None else format(ratio, '.3f')}x")
    # The headline figures: caption-like lengths where measured, else the last distribution.
    key = CAPTION_LENGTHS if CAPTION_LENGTHS in report["runs"] else args.lengths[-1]
    head = report["runs"][key]
    report.update(
        headline_lengths=key,
        capacity_rows_per_s=head["capacity"]["rows_per_s"],
        stream_rows_per_s=head["stream"]["rows_per_s"],
        batch_sync_rows_per_s=head["batch_sync"]["rows_per_s"],
        stream_vs_capacity=head["stream_vs_capacity"],
        stream_vs_batch_sync=head["stream_vs_batch_sync"],
    )
    text = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


def add_feed_bench(kinds, common) -> None:
    p = kinds.add_parser("feed", help="stream vs batch-synchronous feeding of an in-flight engine")
    common(p)
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--unit-rows", type=int, default=64)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--slots", type=int, default=32, help="sequences the engine runs at once")
    p.add_argument("--step-s", type=float, default=0.004)
    p.add_argument("--step-per-active-s", type=float, default=0.0001)
    p.add_argument("--prefill-per-token-s", type=float, default=0.00002)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument(
        "--lengths",
        nargs="+",
        default=["fixed:64", CAPTION_LENGTHS],
        help="answer-length distributions: fixed:N, uniform:LO:HI, lognormal:MEAN:CAP",
    )
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_feed)
