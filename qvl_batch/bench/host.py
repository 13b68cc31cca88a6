"""``qvl-batch bench host`` and ``driver-memory``: the runner's own cost on the host.

- ``host``: the whole runner (fake engine, zero latency) vs a bare decode+resize loop over the
  same images on the same number of cores. The ratio says how much the runner costs on top of
  the image work it cannot avoid.
- ``driver-memory``: peak RSS of the driver process for jobs of growing size (tiny rows), each
  in its own process so peaks do not mix. Flat means bounded by what is in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.dataset as ds

from ..config import ImageConfig
from ..output.state import METRICS_FILE
from ..rows.images import prepare_image
from ..run.validate import load_job
from .common import FAKE_ENGINE, job_io, tiny_rows


def _job_overrides(data: Path, out: Path, cores: int, extra: list[str]) -> list[str]:
    return [
        *job_io(data, out),
        *FAKE_ENGINE,  # the runner's own cost: an engine that takes no time
        "engine.fake.batch_latency_s=0",
        "engine.fake.token_latency_s=0",
        f"cluster.local_num_cpus={cores}",
        *extra,
    ]


def _bare_loop(data: Path, cores: int, image_cfg: ImageConfig) -> tuple[int, float]:
    """Decode + resize every image with ``cores`` threads; (rows, seconds), reads excluded."""
    images = ds.dataset(str(data)).to_table(columns=["image"]).column("image").to_pylist()

    def work(blob: bytes) -> int:
        try:
            return prepare_image(blob, image_cfg).vision_tokens
        except Exception:
            return 0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(work, images, chunksize=4))
    return len(images), time.perf_counter() - t0


def bench_host(args: argparse.Namespace) -> int:
    from ..run.driver import run_job
    from ..tooling.synth import photo_dataset

    work = Path(args.workdir)
    data = photo_dataset(work / f"host-{args.rows}", args.rows, exif_fraction=0.05)
    layout = [
        f"cluster.num_actors={args.actors}",
        f"cluster.cpus_per_actor={args.cores / args.actors}",
        f"batching.prepare_threads={args.threads or max(1, args.cores // args.actors)}",
        "batching.unit_rows=64",
    ]
    cfg = load_job(
        args.job, _job_overrides(data, work / "host-out", args.cores, layout + args.overrides)
    )
    results = []
    for i in range(args.repeat):
        rows, secs = _bare_loop(data, args.cores, cfg.image)
        summary = run_job(cfg, progress_bar=False)
        bare = rows / secs
        steady = summary.rows_this_run / summary.pipeline_s
        e2e = summary.rows_this_run / summary.elapsed_s
        # Where the actors' time went: prepare threads busy, reads, as fractions of their
        # thread-time over the pipeline.
        timings = json.loads((Path(cfg.output.path) / METRICS_FILE).read_text())["actor_timings_s"]
        threads = cfg.batching.prepare_threads * cfg.cluster.num_actors
        busy = timings["prepare_s"] / (threads * summary.pipeline_s)
        reads = timings["read_s"] / timings["prepare_s"]
        results.append(
            {
                "bare": bare,
                "steady": steady,
                "e2e": e2e,
                "prepare_busy": busy,
                "read_vs_prepare": reads,
            }
        )
        print(
            f"run {i + 1}: bare loop {bare:7.1f} rows/s | runner steady {steady:7.1f} rows/s "
            f"(ratio {steady / bare:.3f}) | runner end-to-end incl. Ray start {e2e:7.1f} rows/s "
            f"(ratio {e2e / bare:.3f}) | prepare threads busy {busy:.3f} of the pipeline, reads "
            f"{reads:.3f} of prepare time",
            flush=True,
        )
    best = max(results, key=lambda r: r["steady"] / r["bare"])
    print(
        json.dumps(
            {
                "bench": "host",
                "rows": args.rows,
                "cores": args.cores,
                "actors": args.actors,
                "runs": results,
                "median_ratio_steady": sorted(r["steady"] / r["bare"] for r in results)[
                    len(results) // 2
                ],
                "best_ratio_steady": best["steady"] / best["bare"],
            }
        )
    )
    return 0


def _driver_rss_child(args: argparse.Namespace) -> int:
    """One job in this process; print the driver's peak RSS (MiB) as JSON."""
    from ..run.driver import run_job

    cfg = load_job(
        args.job,
        _job_overrides(Path(args.data), Path(args.out), args.cores, args.overrides),
    )
    summary = run_job(cfg, progress_bar=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from ..output.state import OutputState

    metrics = OutputState(cfg.output.path).metrics() or {}
    print(
        json.dumps(
            {
                "rows": summary.rows_this_run,
                "peak_rss_mib": round(peak_mib, 1),
                "actor_peak_rss_mib": metrics.get("actor_peak_rss_mib"),
                "rows_per_s": round(summary.rows_per_s, 1),
                "status": summary.status,
            }
        )
    )
    return 0


def bench_driver_memory(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    figures = []
    for rows in args.rows:
        data = tiny_rows(work / f"tiny-{rows}", rows)
        cmd = [
            sys.executable,
            "-m",
            "qvl_batch.cli",
            "bench",
            "_driver-rss",
            "--data",
            str(data),
            "--out",
            str(work / f"tiny-out-{rows}"),
            "--cores",
            str(args.cores),
            "--job",
            args.job,
            *args.overrides,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        figures.append(result)
        print(
            f"{rows:>9,} rows: driver peak RSS {result['peak_rss_mib']:7.1f} MiB, "
            f"largest actor {result['actor_peak_rss_mib']:7.1f} MiB, "
            f"{result['rows_per_s']:8.1f} rows/s, {result['wall_s']}s",
            flush=True,
        )
    base = figures[0]["peak_rss_mib"]
    actor_base = figures[0]["actor_peak_rss_mib"]
    print(
        json.dumps(
            {
                "bench": "driver-memory",
                "figures": figures,
                "rss_ratio_largest_vs_smallest": round(figures[-1]["peak_rss_mib"] / base, 3),
                "actor_rss_ratio": round(figures[-1]["actor_peak_rss_mib"] / actor_base, 3),
            }
        )
    )
    return 0


def add_host_bench(kinds, common) -> None:
    host = kinds.add_parser("host", help="runner vs bare decode+resize loop (fake engine)")
    common(host)
    host.add_argument("--rows", type=int, default=400)
    host.add_argument("--actors", type=int, default=1)
    host.add_argument("--threads", type=int, default=0, help="prepare threads per actor")
    host.add_argument("--repeat", type=int, default=3)
    host.set_defaults(func=bench_host)

    mem = kinds.add_parser("driver-memory", help="driver and actor peak RSS as the dataset grows")
    common(mem)
    mem.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    mem.set_defaults(func=bench_driver_memory)

    child = kinds.add_parser("_driver-rss", help=argparse.SUPPRESS)
    common(child)
    child.add_argument("--data", required=True)
    child.add_argument("--out", required=True)
    child.set_defaults(func=_driver_rss_child)
