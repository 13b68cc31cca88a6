"""``qvl-batch bench scale``: rows/s as the number of actors grows (scale-out, issue 7).

For each actor count N a real job runs on a local Ray the job starts itself (N logical CPUs,
one per actor, one prepare thread per actor) with the fake engine standing in for a GPU: each
batch of ``--batch-size`` rows takes ``--batch-latency`` seconds of sleep, so one actor can do
at most batch-size / batch-latency rows/s (16 by default) while the host does only the runner's
own work for tiny 56x56 JPEGs. The dataset has N x ``--rows-per-actor`` rows in units of
``--unit-rows``, so every actor handles many units.

Throughput is rows over ``pipeline_s`` (actors ready -> last commit: Ray and actor start-up are
excluded); the end-to-end figure is printed too. Efficiency(N) = rows/s(N) / (N x rows/s(1)).

So that a shortfall can be explained and not only seen, each point also reports:

- where the actors' time went, from the actors' own timings (``_metrics.json``): the fraction
  of actor-time the engine was busy (``util``), the mean batch, and the engine call's overhead
  per batch over the latency model. rows/s = N x mean batch x util / (latency + overhead)
  exactly, so the efficiency splits into those three factors;
- the commit timeline (commit markers): first commit after ready, and the tail (the spread
  of the last N commits: how long the first actor to run dry waited for the last one);
- CPU over the pipeline window, in cores: this driver process, the actor processes, the rest
  of this job's Ray processes (raylet, GCS, agents, idle workers), and everything else on the
  machine (other users' load), sampled from /proc; and the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

from ..run.validate import load_job
from .common import FAKE_ENGINE, job_io, tiny_rows

SAMPLE_S = 0.5  # /proc sampling period during a point


# ---------------------------------------------------------------------------- CPU accounting
def _machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal, sum(fields)


def _process_ticks(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (class, utime+stime jiffies) for ``root`` and its descendants.

    Classes: ``driver`` (root itself), ``actors`` (Ray workers running a UnitWorker) and
    ``ray`` (every other descendant: raylet, GCS, agents, idle workers, the flight recorder).
    """
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                line = f.read()
        except OSError:
            continue
        rest = line[line.rfind(")") + 2 :].split()
        procs[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    out: dict[int, tuple[str, int]] = {}
    for pid, (_, ticks) in procs.items():
        p, hops = pid, 0
        while p not in (root, 0, 1) and p in procs and hops < 64:
            p, hops = procs[p][0], hops + 1
        if p != root:
            continue
        if pid == root:
            out[pid] = ("driver", ticks)
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read(200)
        except OSError:
            continue
        out[pid] = ("actors" if cmd.startswith(b"ray::UnitWorker") else "ray", ticks)
    return out


class CpuSampler:
    """Samples machine and per-process CPU every ``period`` s in a thread; see :meth:`window`."""

    def __init__(self, period: float = SAMPLE_S):
        self.period = period
        self.samples: list[tuple[float, tuple[int, int, int], dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self._root = os.getpid()
        self._hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                self.samples.append((time.time(), _machine_ticks(), _process_ticks(self._root)))
            except Exception:  # a process vanishing mid-read, an odd /proc: skip one sample
                pass
            if self._stop.wait(self.period):
                return

    def window(self, t0: float, t1: float) -> dict | None:
        """CPU used between wall times t0 and t1, in cores (CPU seconds per second)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (ta, ma, pa), (tb, mb, pb) = inside[0], inside[-1]
        wall = tb - ta
        per_class = {"driver": 0, "actors": 0, "ray": 0}
        for pid, (cls, ticks) in pb.items():
            before = pa.get(pid)
            per_class[cls] += ticks - (before[1] if before and before[0] == cls else 0)
        busy = (mb[0] - ma[0]) / self._hz / wall
        ours = {k: v / self._hz / wall for k, v in per_class.items()}
        cores = os.cpu_count() or 1
        return {
            "window_s": round(wall, 2),
            "machine_busy_cores": round(busy, 2),
            "machine_idle_cores": round(
                cores * (1 - (mb[0] - ma[0] + mb[1] - ma[1]) / max(1, mb[2] - ma[2])), 2
            ),
            "steal_cores": round((mb[1] - ma[1]) / self._hz / wall, 2),
            "driver_cores": round(ours["driver"], 2),
            "actors_cores": round(ours["actors"], 2),
            "ray_other_cores": round(ours["ray"], 2),
            "others_cores": round(max(0.0, busy - sum(ours.values())), 2),
        }


class _ReadyHook(logging.Handler):
    """Notes the wall time of the pool's first "actor N ready" line (pipeline_s starts there)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.t_ready: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if " ready (" in str(record.msg) and self.t_ready is None:
            self.t_ready = time.time()


# ----------------------------------------------------------------------------- one point
def _dataset(work: Path, rows: int, unit_rows: int) -> Path:
    """Tiny-image rows, one row group per unit; made once."""
    shards = max(1, min(16, rows // 4096))
    return tiny_rows(work / f"scale-tiny-{rows}-u{unit_rows}", rows, shards, unit_rows)


def point_overrides(args: argparse.Namespace, n: int, data: Path, out: Path) -> list[str]:
    return [
        *job_io(data, out),
        *FAKE_ENGINE,
        f"engine.fake.batch_latency_s={args.batch_latency}",
        "engine.fake.row_latency_s=0",
        "engine.fake.token_latency_s=0",
        f"batching.max_batch_size={args.batch_size}",
        f"batching.unit_rows={args.unit_rows}",
        "batching.prepare_threads=1",
        "cluster.address=null",  # a local Ray sized to this point, started by the job
        f"cluster.local_num_cpus={n}",
        f"cluster.num_actors={n}",
        "cluster.cpus_per_actor=1",
        *args.overrides,
    ]


def _timeline(markers: list, t_ready: float | None, n: int) -> dict:
    """First commit after ready and the tail (spread of the last N commits), from the commit
    markers' wall times."""
    times = sorted(dt.datetime.fromisoformat(m.committed_at).timestamp() for m in markers)
    if not times:
        return {}
    # The last N commits are each actor's last unit when the work ends evenly: their spread is
    # how long the first actor to run dry waited for the last one.
    last = times[max(0, len(times) - n) :]
    out = {
        "tail_s": round(last[-1] - last[0], 2),
        # actor-seconds spent waiting for the last actor to finish (each actor's last commit
        # stands for the end of its last batch)
        "tail_actor_s": round(sum(last[-1] - t for t in last), 2),
    }
    if t_ready is not None:
        out["first_commit_s"] = round(times[0] - t_ready, 2)
    return out


def run_point(args: argparse.Namespace, n: int, data: Path) -> dict:
    from ..output.state import OutputState
    from ..run.driver import run_job

    out = Path(args.workdir) / f"scale-out-{n}"
    cfg = load_job(args.job, point_overrides(args, n, data, out))
    qlog = logging.getLogger("qvl_batch")
    hook, level = _ReadyHook(), qlog.level
    qlog.addHandler(hook)
    if not qlog.isEnabledFor(logging.INFO):
        qlog.setLevel(logging.INFO)
    load_before = os.getloadavg()
    try:
        with CpuSampler() as sampler:
            t0 = time.time()
            summary = run_job(cfg, progress_bar=False)
    finally:
        qlog.removeHandler(hook)
        qlog.setLevel(level)
    load_after = os.getloadavg()
    state = OutputState(str(out))
    metrics = state.metrics() or {}
    timings = metrics.get("actor_timings_s") or {}
    padding = metrics.get("padding") or {}
    rows = summary.rows_this_run
    pipe = summary.pipeline_s
    point = {
        "actors": n,
        "status": summary.status,
        "rows": rows,
        "units": summary.units_this_run,
        "error_rows": summary.errors_this_run,
        # tail copies run rows twice: the engine's rows exceed the job's by what they ran
        "backup_copies": summary.backup_copies,
        "pipeline_s": round(pipe, 3),
        "elapsed_s": round(summary.elapsed_s, 3),
        "startup_s": None,
        "steady_rows_per_s": rows / pipe if pipe > 0 else 0.0,
        "e2e_rows_per_s": rows / summary.elapsed_s if summary.elapsed_s > 0 else 0.0,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }
    if hook.t_ready is not None:
        point["startup_s"] = round(hook.t_ready - t0, 2)
        point["cpu"] = sampler.window(hook.t_ready, hook.t_ready + pipe)
    batches = padding.get("batches") or 0
    # Seconds inside the engine's generate calls (the batching adapter's clock).
    engine_s = timings.get("engine_run_s", timings.get("engine_s"))
    if batches and engine_s is not None and pipe > 0:
        model_s = batches * args.batch_latency
        point["actors_view"] = {
            "batches": batches,
            "mean_batch": padding.get("mean_batch_size"),
            "engine_s": engine_s,
            "util": round(engine_s / (n * pipe), 4),
            "overhead_per_batch_s": round((engine_s - model_s) / batches, 4),
            "engine_idle_s": timings.get("engine_idle_s"),  # includes waiting for ready
            "prepare_s": timings.get("prepare_s"),
            "read_s": timings.get("read_s"),
        }
    point["timeline"] = _timeline(state.markers(), hook.t_ready, n)
    return point


# ----------------------------------------------------------------------------- the command
def _median_point(runs: list[dict]) -> dict:
    """The run with the median steady rows/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda p: p["steady_rows_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def bench_scale(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    per_actor_ceiling = args.batch_size / args.batch_latency if args.batch_latency > 0 else None
    print(
        f"scale-out: actors {args.actors}, {args.rows_per_actor} rows per actor, units of "
        f"{args.unit_rows} rows, fake engine {args.batch_latency}s per batch of "
        f"{args.batch_size} (model ceiling {_fmt(per_actor_ceiling, '.1f')} rows/s per actor), "
        f"{os.cpu_count()} cores on this machine",
        flush=True,
    )
    runs: dict[int, list[dict]] = {n: [] for n in args.actors}
    for rep in range(args.repeat):
        for n in args.actors:  # interleaved, so drift in machine load hits every N alike
            data = _dataset(work, n * args.rows_per_actor, args.unit_rows)
            p = run_point(args, n, data)
            p["repeat"] = rep + 1
            runs[n].append(p)
            cpu = p.get("cpu") or {}
            av = p.get("actors_view") or {}
            print(
                f"  run {rep + 1} N={n:>2}: {p['status']}, {p['rows']} rows, pipeline "
                f"{p['pipeline_s']:.2f}s -> {p['steady_rows_per_s']:.1f} rows/s (end-to-end "
                f"{p['e2e_rows_per_s']:.1f}, start-up {_fmt(p['startup_s'], '.1f')}s); load "
                f"{p['load_before'][0]:.2f} -> {p['load_after'][0]:.2f}; cpu cores: driver "
                f"{_fmt(cpu.get('driver_cores'), '.2f')} actors "
                f"{_fmt(cpu.get('actors_cores'), '.2f')} ray "
                f"{_fmt(cpu.get('ray_other_cores'), '.2f')}"
                f" others {_fmt(cpu.get('others_cores'), '.2f')} idle "
                f"{_fmt(cpu.get('machine_idle_cores'), '.2f')}; util {_fmt(av.get('util'), '.3f')}"
                f", batch {_fmt(av.get('mean_batch'), '.2f')}, overhead/batch "
                f"{_fmt(av.get('overhead_per_batch_s'), '.4f')}s; first commit "
                f"{_fmt(p['timeline'].get('first_commit_s'), '.2f')}s, tail "
                f"{_fmt(p['timeline'].get('tail_s'), '.2f')}s",
                flush=True,
            )
    points = [_median_point(runs[n]) for n in args.actors]
    base = next((p for p in points if p["actors"] == 1), None)
    one = base["steady_rows_per_s"] if base else None
    one_e2e = base["e2e_rows_per_s"] if base else None
    for p in points:
        n = p["actors"]
        p["ideal_rows_per_s"] = n * one if one else None
        p["efficiency"] = p["steady_rows_per_s"] / (n * one) if one else None
        p["e2e_efficiency"] = p["e2e_rows_per_s"] / (n * one_e2e) if one_e2e else None
        p["model_ceiling_rows_per_s"] = n * per_actor_ceiling if per_actor_ceiling else None
    header = (
        f"{'actors':>6} {'rows':>7} {'pipeline_s':>10} {'rows/s':>8} {'ideal':>8} "
        f"{'effic.':>6} {'e2e r/s':>8} {'e2e eff':>7} {'util':>6} {'batch':>5} {'ovh/b s':>7} "
        f"{'tail_s':>6} {'load before->after':>18} {'cpu drv/act/ray/oth/idle':>25}"
    )
    print(header)
    for p in points:
        cpu = p.get("cpu") or {}
        av = p.get("actors_view") or {}
        cpu_txt = "/".join(
            _fmt(cpu.get(k), ".2f")
            for k in (
                "driver_cores",
                "actors_cores",
                "ray_other_cores",
                "others_cores",
                "machine_idle_cores",
            )
        )
        print(
            f"{p['actors']:>6} {p['rows']:>7} {p['pipeline_s']:>10.2f} "
            f"{p['steady_rows_per_s']:>8.1f} {_fmt(p['ideal_rows_per_s'], '8.1f')} "
            f"{_fmt(p['efficiency'], '6.3f')} {p['e2e_rows_per_s']:>8.1f} "
            f"{_fmt(p['e2e_efficiency'], '7.3f')} {_fmt(av.get('util'), '6.3f')} "
            f"{_fmt(av.get('mean_batch'), '5.2f')} {_fmt(av.get('overhead_per_batch_s'), '7.4f')} "
            f"{_fmt(p['timeline'].get('tail_s'), '6.2f')} "
            f"{p['load_before'][0]:>8.2f} -> {p['load_after'][0]:<6.2f} {cpu_txt:>25}"
        )
    largest = points[-1]
    report = {
        "bench": "scale",
        "actors": args.actors,
        "rows_per_actor": args.rows_per_actor,
        "unit_rows": args.unit_rows,
        "batch_size": args.batch_size,
        "batch_latency_s": args.batch_latency,
        "repeat": args.repeat,
        "cores": os.cpu_count(),
        "points": points,
        "runs": [p for n in args.actors for p in runs[n]],
        "efficiency_at_largest": largest["efficiency"],
    }
    eff = largest["efficiency"]
    if eff is not None and math.isfinite(eff):
        print(f"efficiency at {largest['actors']} actors: {eff:.3f}")
    line = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


def add_scale_bench(kinds, common) -> None:
    p = kinds.add_parser("scale", help="rows/s vs number of actors (fake engine as a GPU)")
    common(p)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rows-per-actor", type=int, default=640)
    p.add_argument("--unit-rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="batching.max_batch_size")
    p.add_argument("--batch-latency", type=float, default=0.5, help="fake seconds per batch")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_scale)
