"""``bench gpu`` section ``scaling``: the same job on 1 GPU actor and on N, and one actor whose
model spans N GPUs, in one command.

For each ``--scaling-units`` K, a job of K units per actor at the largest actor count (so
``K x N`` units of ``--scaling-unit-batches`` batches) runs once per ``--scaling-actors`` count.
Scaling = rows/s on N actors / (N x rows/s on one), steady (first actor ready -> last commit).
Each run also says how the units were spread (committed per actor), each actor's engine busy
fraction over the job (its timeline in ``_metrics.json``), the tail's moves and backup copies,
and which GPUs each actor saw. ``--scaling-split N`` adds one actor with
``cluster.num_gpus_per_actor=N`` (the hf engine's device map) on the shortest job.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..config import Config


def actor_figures(out: Path) -> dict:
    """From a finished output's ``_metrics.json``: spread, busy fractions, tail, GPUs seen."""
    metrics = json.loads((out / "_metrics.json").read_text())
    summary = metrics["summary"]
    runs = metrics.get("unit_runs", [])
    slots = len(metrics.get("units_by_actor", [])) or 1
    committed = [
        sum(r["actor"] == a and r["outcome"] == "committed" for r in runs) for a in range(slots)
    ]
    elapsed = summary.get("elapsed_s") or 0.0
    busy = {}
    for lane in metrics.get("actor_timeline", {}).get("actors", []):
        busy[lane["actor"]] = round(sum(lane["busy"]) / elapsed, 4) if elapsed else None
    starts = {}
    for r in runs:
        starts[r["actor"]] = min(starts.get(r["actor"], r["start_s"]), r["start_s"])
    return {
        "units_committed_by_actor": committed,
        "engine_busy_fraction_by_actor": [busy.get(a) for a in range(slots)],
        "first_unit_s_by_actor": [
            round(starts[a], 2) if a in starts else None for a in range(slots)
        ],
        "units_moved": summary.get("units_moved", 0),
        "backup_copies": summary.get("backup_copies", 0),
        "backup_wins": summary.get("backup_wins", 0),
        "gpus_by_actor": [
            {"gpu_ids": p.get("gpu_ids"), "visible": p.get("visible_gpus")}
            for p in metrics.get("actors", [])
        ],
    }


def scaling(
    args: argparse.Namespace,
    config: Callable[..., Config],
    dataset: Callable[[Path, list], list],
    run_runner: Callable[[Config, str, bool], dict],
    batch_size: int,
    cuda: bool,
) -> dict:
    """Every job size on every actor count; ratios to one actor."""
    unit_rows = args.scaling_unit_batches * batch_size
    top = max(args.scaling_actors)
    side = args.image_size
    # Every actor gets the same share of the machine on every actor count (the runner section
    # gives its one actor all --cores).
    cpus = max(1, args.cores // top)

    def layout(actors: int, gpus: int = 1) -> tuple[str, ...]:
        return (
            f"cluster.num_actors={actors}",
            f"cluster.num_gpus_per_actor={gpus}",
            f"cluster.cpus_per_actor={cpus}",
            f"batching.unit_rows={unit_rows}",
            "batching.min_units_per_actor=0",  # the units per actor this section sets
            "batching.units_in_flight_per_actor=2",
        )

    result: dict = {"batch_size": batch_size, "unit_rows": unit_rows, "jobs": []}
    for per_actor in args.scaling_units:
        rows = per_actor * top * unit_rows
        data = Path(args.workdir) / f"gpu-scaling-{rows}-{side}"
        dataset(data, [(side, side)] * rows)
        job: dict = {"units_per_actor": per_actor, "units": per_actor * top, "rows": rows}
        for actors in args.scaling_actors:
            cfg = config(f"gpu-scaling-{actors}-out", batch_size, layout(actors), data)
            run = run_runner(cfg, f"scaling {rows} rows on {actors} actor(s)", cuda)
            run.update(actor_figures(Path(cfg.output.path)))
            job[f"actors_{actors}"] = run
        one = job.get("actors_1", {}).get("steady_rows_per_s")
        for actors in args.scaling_actors:
            rate = job[f"actors_{actors}"]["steady_rows_per_s"]
            if one and actors > 1:
                job[f"scaling_{actors}"] = round(rate / (actors * one), 4)
        result["jobs"].append(job)
        print(
            f"scaling, {per_actor} units per actor ({rows} rows): "
            + ", ".join(f"{k} {v}" for k, v in job.items() if k.startswith("scaling_")),
            flush=True,
        )
    if args.scaling_split > 1:
        per_actor = min(args.scaling_units)
        rows = per_actor * top * unit_rows
        data = Path(args.workdir) / f"gpu-scaling-{rows}-{side}"
        cfg = config("gpu-scaling-split-out", batch_size, layout(1, args.scaling_split), data)
        run = run_runner(cfg, f"one actor over {args.scaling_split} GPUs, {rows} rows", cuda)
        run.update(actor_figures(Path(cfg.output.path)))
        result["split"] = {"gpus_per_actor": args.scaling_split, "rows": rows, **run}
    return result


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scaling-actors", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--scaling-units",
        type=int,
        nargs="+",
        default=[2, 8],
        help="job sizes, in units per actor at the largest actor count",
    )
    p.add_argument("--scaling-unit-batches", type=int, default=1, help="batches per unit")
    p.add_argument(
        "--scaling-split", type=int, default=0, help="also one actor over this many GPUs (hf)"
    )
