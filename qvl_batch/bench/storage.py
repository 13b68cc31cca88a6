"""``qvl-batch bench storage``: the runner's input path from S3 vs from local disk.

The same shards are read through the code actors use (``read_unit_table`` + ``unit_rows``:
ranged, retried reads of only the row groups and columns a unit needs), with the same number
of threads, from a local directory and from an S3 protocol server (moto started on loopback,
or ``--endpoint-url``). Rows/s and MB/s of image bytes are printed side by side, with ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..rows.manifest import plan_job
from ..rows.reader import read_unit_table, unit_rows
from ..run.validate import load_job
from ..storage import Storage


def _read_all(cfg, threads: int) -> dict:
    """Rows, image bytes, plan and read seconds, and storage requests for every unit."""
    storage = Storage.for_input(cfg)
    t0 = time.perf_counter()
    plan = plan_job(cfg, storage)
    t_plan = time.perf_counter() - t0
    plan_requests = storage.stats.snapshot()["requests"]

    def read(unit) -> tuple[int, int]:
        table = read_unit_table(unit, cfg, storage)
        rows = unit_rows(unit, table, cfg)
        return len(rows), sum(len(r.image) for r in rows if isinstance(r.image, bytes))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(read, plan.units()))
    t_read = time.perf_counter() - t0
    rows, nbytes = sum(r for r, _ in done), sum(b for _, b in done)
    # Local files are read through plain file handles, so only remote reads count requests.
    read_requests = storage.stats.snapshot()["requests"] - plan_requests
    return {
        "rows_per_s": rows / t_read,
        "mb_per_s": nbytes / 1e6 / t_read,
        "plan_s": t_plan,
        "rows": rows,
        "units": len(done),
        "plan_requests": plan_requests,
        "requests_per_unit": read_requests / len(done) if done else 0.0,
    }


def bench_storage(args: argparse.Namespace) -> int:
    import s3fs

    from ..tooling.s3local import MotoServer
    from ..tooling.synth import photo_dataset

    work = Path(args.workdir)
    data = photo_dataset(
        work / f"storage-{args.rows}", args.rows, args.shards, max_side=1600, exif_fraction=0.05
    )
    server = None if args.endpoint_url else MotoServer()
    endpoint = args.endpoint_url or server.endpoint
    # A local moto accepts any credentials; a real endpoint uses the standard chain.
    creds = {"key": "bench", "secret": "bench"} if server else {}
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **creds)
        if not fs.exists(args.bucket):
            fs.mkdir(args.bucket)
        for f in sorted(data.glob("*.parquet")):
            fs.put_file(str(f), f"{args.bucket}/shards/{f.name}")
        common = [
            f"output.path={work / 'unused'}",
            f"batching.unit_rows={args.unit_rows}",
            f"storage.endpoint_url={endpoint}",
            *[f"input.storage_options.{k}={v}" for k, v in creds.items()],
            *args.overrides,
        ]
        sides = {
            "local": load_job(args.job, [f"input.paths=[{data}/*.parquet]", *common]),
            "s3": load_job(args.job, [f"input.paths=[s3://{args.bucket}/shards]", *common]),
        }
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for i in range(args.repeat):
            for side, cfg in sides.items():  # alternate, so drift hits both sides alike
                r = _read_all(cfg, args.threads)
                runs[side].append(r)
                requests = (
                    f", {r['plan_requests']} requests to plan, "
                    f"{r['requests_per_unit']:.1f} per unit"
                    if side == "s3"
                    else ""
                )
                print(
                    f"run {i + 1} {side:>5}: {r['rows_per_s']:8.1f} rows/s "
                    f"{r['mb_per_s']:7.1f} MB/s (plan {r['plan_s']:.2f}s, {r['rows']} rows in "
                    f"{r['units']} units{requests})",
                    flush=True,
                )
    finally:
        if server:
            server.stop()
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("rows_per_s", "mb_per_s", "plan_s")}
        for side, rs in runs.items()
    }
    ratio = med["s3"]["rows_per_s"] / med["local"]["rows_per_s"]
    print(
        f"median: local {med['local']['rows_per_s']:.1f} rows/s "
        f"({med['local']['mb_per_s']:.1f} MB/s) | s3 {med['s3']['rows_per_s']:.1f} rows/s "
        f"({med['s3']['mb_per_s']:.1f} MB/s) | s3/local {ratio:.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "storage",
                "rows": args.rows,
                "threads": args.threads,
                "endpoint": "moto (local)" if server else endpoint,
                "median": med,
                "ratio_s3_vs_local_rows": ratio,
            }
        )
    )
    return 0


def add_storage_bench(kinds, common) -> None:
    p = kinds.add_parser("storage", help="input read path: S3 server vs local disk")
    common(p)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--unit-rows", type=int, default=128)
    p.add_argument("--threads", type=int, default=4, help="units read at once (actors x window)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bucket", default="qvl-bench")
    p.add_argument("--endpoint-url", default=None, help="an S3 endpoint instead of local moto")
    p.set_defaults(func=bench_storage)
