"""``qvl-batch bench driver``: what the driver alone schedules and commits, 64 actors simulated.

The real :class:`~qvl_batch.run.driver.Driver` runs a real plan over real Parquet footers and
commits real part files and markers (local disk, or an S3 protocol server with ``--s3``); only
the actors are simulated, in-process: each answers a unit after ``--latency-s`` with a result
table of the unit's size (built from a template, no images read), through the same
``wait``/``get`` interface the Ray pool offers. So the figure is the driver's own ceiling:
planning, hand-out, exactly-once checks, Parquet encoding, writes and ledger bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import pyarrow as pa

from ..engines.bucketing import PaddingStats
from ..output.schema import ROW_RESULT
from ..run.dispatch import COMMIT_THREADS
from ..run.driver import Driver
from ..run.handout import Outcome
from ..run.liveness import Beat
from ..run.validate import load_job
from .common import job_io, tiny_rows


def _template(rows: int) -> pa.Table:
    cols = {name: [None] * rows for name in ROW_RESULT.names}
    cols.update(
        source_row=list(range(rows)),
        id=[f"row-{i}" for i in range(rows)],
        ok=[True] * rows,
        text=["a photo of a cat on a wooden table"] * rows,
        finish_reason=["stop"] * rows,
        prompt_tokens=[89] * rows,
        vision_tokens=[64] * rows,
        output_tokens=[9] * rows,
        image_width=[224] * rows,
        image_height=[224] * rows,
        resized_width=[224] * rows,
        resized_height=[224] * rows,
        image_sha256=["0" * 64] * rows,
        result_key=["0" * 32] * rows,
    )
    return pa.table(cols, schema=ROW_RESULT)


class _Method:
    def __init__(self, fn, executor):
        self.fn, self.executor = fn, executor

    def remote(self, *args, **kwargs) -> Future:
        return self.executor.submit(self.fn, *args, **kwargs)


class SimulatedActor:
    """Answers ``process_unit`` like a UnitWorker would, after a fixed latency."""

    def __init__(self, latency_s: float, executor, templates: dict):
        self.latency_s = latency_s
        self.templates = templates
        self.process_unit = _Method(self._process_unit, executor)

    def _process_unit(self, unit, solo=(), skip=(), only=None) -> pa.Table:
        if self.latency_s:
            time.sleep(self.latency_s)
        table = self.templates.get(unit.num_rows)
        if table is None:
            table = self.templates.setdefault(unit.num_rows, _template(unit.num_rows))
        rows = pa.array(range(unit.row_start, unit.row_start + unit.num_rows), pa.int64())
        return table.set_column(0, ROW_RESULT.field("source_row"), rows)


class SimulatedPool:
    """The dispatcher's ``Pool`` over ``n`` in-process simulated actors: ready from the start,
    never dying, never stalling, units never taken back."""

    engine_name, engine_version = "simulated", "0"
    can_move = False

    def __init__(self, n: int, latency_s: float):
        self._executor = ThreadPoolExecutor(max(4, min(64, n * 2)), "sim-actor")
        templates: dict = {}
        self.actors = [SimulatedActor(latency_s, self._executor, templates) for _ in range(n)]
        self.live = [True] * n
        self.init_failures = [0] * n
        self.placement: list = [None] * n
        self.timelines: list[dict] = []

    def starting(self) -> list:
        return []

    def started(self, ref):
        raise RuntimeError("simulated actors are ready from the start")

    def retire(self, index: int) -> None:
        raise RuntimeError("simulated actors always start")

    def kill_silent(self, index: int, beat) -> None:
        raise RuntimeError("simulated actors never stall")

    def withdraw(self, index: int, unit_id: str) -> bool:
        return False  # can_move is False: never asked

    def drop(self, index: int, unit_id: str) -> None:
        pass  # never a copy: backup copies need moves' tail (can_move)

    @staticmethod
    def wait(refs: list, timeout: float) -> list:
        done, _ = wait(refs, timeout=timeout, return_when=FIRST_COMPLETED)
        return [r for r in refs if r.done()] if done else []

    @staticmethod
    def get(ref) -> Outcome:
        try:
            return Outcome(table=ref.result())
        except Exception as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}")

    def crash_batch(self, index: int):
        return None, False

    def health(self) -> dict[int, Beat]:
        """Simulated actors never stall: each is always just heard from."""
        return {i: Beat(0.0, 0, 0, 0.0) for i in range(len(self.actors))}

    def replace(self, index: int):
        raise RuntimeError("simulated actors do not die")

    def collect_stats(self):
        return PaddingStats(), {}, {}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _run(data: Path, out: str, args, extra: list[str], commit_threads: int) -> dict:
    cfg = load_job(
        args.job,
        [
            *job_io(data, out),
            f"batching.unit_rows={args.unit_rows}",
            f"batching.units_in_flight_per_actor={args.window}",
            "limits.min_rows_for_error_check=1000000000",
            "input.passthrough_columns=[]",  # simulated answers carry no input columns
            "engine.name=fake",  # the actors are simulated: no model to load or check
            "batching.min_units_per_actor=0",  # units of --unit-rows, whatever the rows
            *extra,
            *args.overrides,
        ],
    )
    t0 = time.perf_counter()

    def simulated(cfg, reuse, job_id):
        return SimulatedPool(args.actors, args.latency_s)

    summary = Driver(cfg, False, commit_threads, make_pool=simulated).run()
    wall = time.perf_counter() - t0
    assert summary.exit_code == 0, summary.lines()
    return {
        "rows": summary.rows_this_run,
        "units": summary.units_this_run,
        "pipeline_s": round(summary.pipeline_s, 2),
        "rows_per_s": round(summary.rows_this_run / summary.pipeline_s, 1),
        "wall_s": round(wall, 2),
    }


def bench_driver(args: argparse.Namespace) -> int:
    args.commit_threads = args.commit_threads or [COMMIT_THREADS]

    work = Path(args.workdir)
    data = tiny_rows(work / f"driver-{args.rows}", args.rows)
    targets = [("local", str(work / "driver-out"), [])]
    server = None
    if args.s3:
        import s3fs

        from ..tooling.s3local import MotoServer

        server = MotoServer()
        s3fs.S3FileSystem(endpoint_url=server.endpoint, key="bench", secret="bench").mkdir(
            "bench-driver"
        )
        creds = {"key": "bench", "secret": "bench"}  # the local server takes any
        s3 = [f"storage.endpoint_url={server.endpoint}"]
        s3 += [f"output.storage_options.{k}={v}" for k, v in creds.items()]
        targets.append(("s3", "s3://bench-driver/out", s3))
    figures = {}
    try:
        for name, out, extra in targets:
            for threads in args.commit_threads:
                runs = [_run(data, out, args, extra, threads) for _ in range(args.repeat)]
                best = max(runs, key=lambda r: r["rows_per_s"])
                figures[f"{name}/{threads}"] = {"best": best, "runs": runs}
                shown = ", ".join(f"{r['rows_per_s']:,.0f}" for r in runs)
                print(
                    f"{name:>5}, {threads} commit threads: {args.actors} simulated actors, "
                    f"{best['rows']:,} rows in {best['units']} units: "
                    f"{best['rows_per_s']:,.0f} rows/s "
                    f"({best['units'] / best['pipeline_s']:,.1f} commits/s; runs {shown})",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    print(
        json.dumps(
            {
                "bench": "driver",
                "actors": args.actors,
                "latency_s": args.latency_s,
                "unit_rows": args.unit_rows,
                "load_avg": os.getloadavg(),
                "figures": figures,
            }
        )
    )
    return 0


def add_driver_bench(kinds, common) -> None:
    p = kinds.add_parser("driver", help="the driver alone: rows/s it schedules and commits")
    common(p)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--actors", type=int, default=64)
    p.add_argument("--latency-s", type=float, default=0.0, help="per unit, per actor")
    p.add_argument("--unit-rows", type=int, default=512)
    p.add_argument("--window", type=int, default=2, help="units in flight per actor")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--s3", action="store_true", help="also commit to a local S3 server (moto)")
    p.add_argument(
        "--commit-threads", type=int, nargs="+", help="driver commit pool sizes to compare"
    )
    p.set_defaults(func=bench_driver)
