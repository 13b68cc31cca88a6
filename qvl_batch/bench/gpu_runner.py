"""The whole runner as a GPU benchmark section: one real job, its steady rows/s from the
commit times, GPU samples beside it; and a section run in a child process (a fresh CUDA context)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from ..config import Config
from ..tooling.gpu_sampler import GpuSampler
from .floor import FLOOR_IMAGES_PER_S


def run_runner(cfg: Config, label: str, cuda: bool) -> dict:
    """One whole job; rates, stage fractions, padding and (on a GPU) its busy fraction."""
    from ..output.state import METRICS_FILE
    from ..run.driver import run_job

    sampler = GpuSampler() if cuda else None
    sampling = sampler.start() if sampler else False
    t0 = time.perf_counter()
    try:
        summary = run_job(cfg, progress_bar=False)
    finally:
        if sampler:
            sampler.stop()
    wall_s = time.perf_counter() - t0
    out = Path(cfg.output.path)
    metrics = json.loads((out / METRICS_FILE).read_text())
    pipeline = summary.pipeline_s or float("nan")
    timings = metrics.get("actor_timings_s", {})
    result = {
        "status": summary.status,
        "rows": summary.rows_this_run,
        "error_rows": summary.errors_this_run,
        "steady_rows_per_s": round(summary.rows_this_run / pipeline, 3),
        "e2e_rows_per_s": round(summary.rows_this_run / summary.elapsed_s, 3),
        "pipeline_s": round(summary.pipeline_s, 2),
        "elapsed_s": round(summary.elapsed_s, 2),
        "wall_s": round(wall_s, 2),
        "actor_timings_s": timings,
        # prepare_s is summed over the prepare threads, so it can exceed 1. The warm-up is
        # start-up, before the pipeline: it stays in actor_timings_s only.
        "stage_fractions": {
            k.removesuffix("_s"): round(v / pipeline, 4)
            for k, v in timings.items()
            if k in ("read_s", "prepare_s", "engine_s", "engine_idle_s")
        },
        "padding": metrics.get("padding", {}),
        # how each actor's engine ran (its settings' auto resolved): what the variant asked for
        "engine_modes": [a.get("engine_modes") for a in metrics.get("actors", [])],
    }
    batches = result["padding"].get("batches") or 0
    result["engine_s_per_batch"] = {
        k.removeprefix("engine_").removesuffix("_s"): round(v / batches, 4)
        for k, v in timings.items()
        if k.startswith("engine_") and k not in ("engine_s", "engine_idle_s") and batches
    }
    result["floor_fraction"] = round(result["steady_rows_per_s"] / FLOOR_IMAGES_PER_S, 4)
    commits = _commit_times(out)
    if sampler is not None:
        if sampling:
            # Steady part: actors ready -> last commit, i.e. pipeline_s back from the last one.
            end = commits[-1][0] if commits else time.time()
            result["gpu"] = sampler.summary(end - summary.pipeline_s, end)
        else:
            result["gpu"] = {"note": sampler.note}
    if summary.status != "succeeded":
        result["message"] = summary.message
    # why rows failed: each error code's count and its first message (the log has neither)
    result["error_codes"], result["error_messages"] = error_codes(out)
    pad = result["padding"]
    print(
        f"{label}: steady {result['steady_rows_per_s']:8.2f} rows/s, end-to-end "
        f"{result['e2e_rows_per_s']:8.2f} rows/s ({summary.rows_this_run} rows, pipeline "
        f"{summary.pipeline_s:.1f}s of {summary.elapsed_s:.1f}s), padding "
        f"{pad.get('padding_fraction', 0):.3f} (arrival order "
        f"{pad.get('fifo_padding_fraction', 0):.3f}), mean batch {pad.get('mean_batch_size')}"
        f"{'' if summary.status == 'succeeded' else ' [' + summary.status + ']'}",
        flush=True,
    )
    if result["error_codes"]:
        print(f"  {errors_line(result)}", flush=True)
    return result


def error_codes(out: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Rows per error code in a local output's ``errors/`` parts, and each code's first message
    (in part-name order, cut to :data:`MESSAGE_CHARS`)."""
    import pyarrow.parquet as pq

    from ..output.state import ERRORS_DIR

    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for path in sorted((out / ERRORS_DIR).glob("*.parquet")):
        table = pq.read_table(path, columns=["error_code", "error_message"])
        for code, message in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            code = code or "?"
            counts[code] = counts.get(code, 0) + 1
            first.setdefault(code, (message or "")[:MESSAGE_CHARS])
    return dict(sorted(counts.items())), first


MESSAGE_CHARS = 500


def errors_line(run: dict) -> str:
    """'errors: ENGINE_ERROR 69 (AssertionError: ...)' from a runner's figures."""
    codes, messages = run.get("error_codes") or {}, run.get("error_messages") or {}
    return "errors: " + "; ".join(
        f"{code} {n} (first: {messages.get(code) or 'no message'})" for code, n in codes.items()
    )


def _commit_times(out: Path) -> list[tuple[float, int]]:
    """(commit time as a Unix timestamp, rows) of every unit marker of a local output, sorted."""
    from ..output.marker import Marker
    from ..output.state import UNITS_DIR

    commits = []
    for path in (out / UNITS_DIR).glob("*.json"):
        marker = Marker.parse(path.read_bytes())
        if marker is not None:
            when = dt.datetime.fromisoformat(marker.committed_at).timestamp()
            commits.append((when, marker.num_rows))
    return sorted(commits)


def in_child(fn, *args):
    """``fn(*args)`` in a fresh process that exits before the next section starts.

    Measured on the H200 (docs/PERFORMANCE.md): with the bare engine run in this process, a
    runner started after it generated 19% slower per batch (6.42 s vs 5.38 s, GPU busy 0.44 vs
    0.54) than when the engine had run in a process that had exited (the actor section): state
    the engine leaves in a live process (its CUDA context and whatever else) must not tax the
    sections after it.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
