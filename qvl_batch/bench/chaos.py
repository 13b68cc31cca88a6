"""``qvl-batch bench chaos``: a job under random SIGKILLs of its actors and its driver.

Each run makes a fresh output, starts ``qvl-batch run`` and, every ``--min-gap``..``--max-gap``
seconds, kills one of: an actor while its engine loads (start-up), a working actor, the driver,
or the driver while a unit is being committed (part files written, marker not yet); a killed
driver is started again and resumes (``--phases`` narrows what is hit; overrides after the
options apply to every run, so ``engine.name=hf`` runs it on GPUs). After ``--kills`` kills the
job runs to its end, then ``verify`` checks the output and its rows are compared with an
uninterrupted run's. Per run it prints the kills by phase, the actor restarts the drivers
logged, the seconds, and the verdicts.

Only this job's processes are killed: its actors carry ``QVL_JOB_ID`` (the ActorPool's
runtime_env) and are told apart by the title Ray gives them ("ray::UnitWorker.__init__" while
the constructor runs); never by a process title other jobs share.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("startup", "actor", "driver", "commit")
COMPARED = ("id", "text", "finish_reason", "output_tokens", "error_code")


def job_id_of(output: Path, timeout: float = 60.0) -> str:
    """The job id from ``_job.json`` (written before any actor starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads((output / "_job.json").read_text())["job_id"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise RuntimeError(f"no _job.json in {output} after {timeout}s")


def job_actors(job_id: str) -> list[tuple[int, str]]:
    """(pid, phase) of every live process of this job's actors. Phases, from the title Ray
    gives the process: "booting" (the worker is still starting Python), "loading" (its
    creation task, the engine's constructor, is running) or "working" (ready)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get("QVL_JOB_ID") != job_id or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, OSError):
            continue
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::UnitWorker.__init__"):
            phase = "loading"
        elif title.startswith("ray::UnitWorker"):
            phase = "working"
        else:
            phase = "booting"
        found.append((p.pid, phase))
    return found


def start_driver(
    job: Path, log_path: Path | None = None, overrides: list[str] = ()
) -> subprocess.Popen:
    """``qvl-batch run JOB [OVERRIDES]`` in its own process group; output to ``log_path``
    (appended) or a pipe."""
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), *overrides, "--no-progress"]
    out = open(log_path, "ab") if log_path else subprocess.PIPE  # noqa: SIM115 - the child's
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def uncommitted_part(output: Path) -> bool:
    """A unit's part file is written but its marker is not yet: a commit in progress."""
    markers = {p.stem for p in (output / "_state" / "units").glob("*.json")}
    return any(
        p.stem[len("part-") :] not in markers
        for sub in ("data", "errors")
        for p in (output / sub).glob("part-*.parquet")
    )


class Chaos:
    """One job under kills: ``step()`` waits a random gap and kills in a random phase."""

    def __init__(
        self,
        job: Path,
        output: Path,
        rng: random.Random,
        gaps=(0.5, 2.5),
        log=None,
        phases: tuple[str, ...] = PHASES,
        overrides: list[str] = (),
    ):
        self.job, self.output, self.rng, self.gaps, self.log_path = job, output, rng, gaps, log
        self.phases, self.overrides = phases, list(overrides)
        self.kills = dict.fromkeys(PHASES, 0)
        self.proc = start_driver(job, log, self.overrides)
        self.job_id = job_id_of(output)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_actor(self, phase: str) -> bool:
        """Kill one of this job's actors that is "loading" (start-up) or "working"."""
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and self.alive():
            pids = [p for p, ph in job_actors(self.job_id) if ph == phase]
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills["startup" if phase == "loading" else "actor"] += 1
                return True
            time.sleep(0.02)
        return False

    def kill_driver(self, in_commit: bool) -> None:
        """Kill the driver (waiting, if asked and for at most 5 s, for a commit in progress)
        and start it again."""
        phase = "driver"
        if in_commit:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.alive():
                if uncommitted_part(self.output):
                    phase = "commit"
                    break
                time.sleep(0.003)
        if not self.alive():
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills[phase] += 1
        self.proc = start_driver(self.job, self.log_path, self.overrides)

    def step(self) -> bool:
        """One kill; False if the job ended first."""
        deadline = time.monotonic() + self.rng.uniform(*self.gaps)
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        if not self.alive():
            return False
        phase = self.rng.choice(self.phases)
        if phase == "startup":
            # A loading actor: a fresh driver's, or the replacement of a working one killed now.
            if not self.kill_actor("loading") and self.kill_actor("working"):
                self.kill_actor("loading")
        elif phase == "actor":
            self.kill_actor("working")
        else:
            self.kill_driver(in_commit=phase == "commit")
        return True

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Let the job end (once more if a kill landed as the last driver finished)."""
        for _ in range(2):
            out = self.proc.communicate(timeout=timeout)[0]
            text = out.decode(errors="replace") if out else ""
            if self.proc.returncode == 0:
                break
            self.proc = start_driver(self.job, self.log_path, self.overrides)
        return self.proc.returncode, text


def rows_of(output: Path) -> list[tuple]:
    """Every output row's compared columns, sorted (data and errors together)."""
    import pyarrow.dataset as ds

    rows = []
    for sub in ("data", "errors"):
        folder = output / sub
        if folder.exists() and any(folder.glob("*.parquet")):
            for r in ds.dataset(str(folder)).to_table().to_pylist():
                rows.append(tuple(r.get(k) for k in COMPARED))
    return sorted(rows, key=repr)


def _job_file(args, data: Path, output: Path, name: str, chaos: bool) -> Path:
    import yaml

    job = {
        "defaults": ["engine/fake"],
        "job": {"name": name},
        "input": {"paths": [f"{data}/*.parquet"]},
        "batching": {"unit_rows": args.unit_rows, "max_batch_size": 8, "max_wait_s": 0.2},
        "output": {"path": str(output)},
        "cluster": {"num_actors": args.actors, "address": args.address},
        "limits": {"max_error_fraction": 0.5, "max_row_crashes": 4, "max_actor_restarts": 10_000},
    }
    if chaos:
        job["engine"] = {"fake": {"batch_latency_s": args.batch_latency, "load_s": args.load_s}}
    path = output.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_chaos(args: argparse.Namespace) -> dict:
    """Every run; returns the report (also printed as one JSON line)."""
    from ..commands.verify import verify_output
    from ..tooling.synth import SynthSpec, make_dataset
    from .common import made_once

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The user's overrides apply to the reference run and the chaos runs alike (an engine, a
    # model: `engine.name=hf engine.model=DIR` runs this on GPUs).
    overrides = list(args.overrides)
    spec = SynthSpec(
        rows=args.rows, shards=4, row_group_rows=16, max_side=160, corrupt_fraction=0.03
    )
    data = made_once(work / f"chaos-data-{args.rows}", lambda path: make_dataset(path, spec))
    ref = work / "chaos-ref"
    if not (ref / "_SUCCESS").exists():
        proc = start_driver(_job_file(args, data, ref, "chaos-ref", chaos=False), None, overrides)
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"the reference run failed: {proc.stdout.read().decode()}")
    want = rows_of(ref)
    rng = random.Random(args.seed)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if not phases or set(phases) - set(PHASES):
        raise SystemExit(f"--phases: a comma list of {', '.join(PHASES)}")
    runs = []
    for n in range(1, args.runs + 1):
        out = work / f"chaos-out-{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        log = work / f"chaos-{n}.log"
        log.unlink(missing_ok=True)
        t0 = time.monotonic()
        chaos = Chaos(
            _job_file(args, data, out, "chaos", chaos=True),
            out,
            rng,
            (args.min_gap, args.max_gap),
            log,
            phases,
            overrides,
        )
        while sum(chaos.kills.values()) < args.kills and chaos.step():
            pass
        code, _ = chaos.finish()
        text = log.read_text(errors="replace")
        run = {
            "run": n,
            "kills": sum(chaos.kills.values()),
            "by_phase": dict(chaos.kills),
            "restarts": text.count("starting a replacement"),
            "drivers": chaos.kills["driver"] + chaos.kills["commit"] + 1,
            "seconds": round(time.monotonic() - t0, 1),
            "exit": code,
            "verify_ok": code == 0 and verify_output(str(out)).ok,
            "equal_to_uninterrupted": code == 0 and rows_of(out) == want,
            "rows_differing": len(set(rows_of(out)) ^ set(want)) // 2 if code == 0 else None,
        }
        runs.append(run)
        print(
            f"run {n:>3}: {run['kills']} kills {run['by_phase']}, {run['restarts']} actor "
            f"restarts, {run['drivers']} drivers, {run['seconds']}s, exit {code}, verify "
            f"{'OK' if run['verify_ok'] else 'FAILED'}, rows "
            f"{'equal' if run['equal_to_uninterrupted'] else 'DIFFER'}",
            flush=True,
        )
    ok = sum(r["verify_ok"] and r["equal_to_uninterrupted"] for r in runs)
    report = {
        "bench": "chaos",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "runs": runs,
        "passed": ok,
        "of": len(runs),
    }
    return report


def bench_chaos(args: argparse.Namespace) -> int:
    report = run_chaos(args)
    print(f"{report['passed']} of {report['of']} runs: verify OK and rows equal")
    text = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0 if report["passed"] == report["of"] else 1


def add_chaos_bench(kinds, common) -> None:
    p = kinds.add_parser("chaos", help="a job under random SIGKILLs of actors and driver")
    common(p)
    p.add_argument("--kills", type=int, default=50, help="kills per run")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--unit-rows", type=int, default=16)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument(
        "--address", default=None, help="a Ray to join (default: each driver starts one)"
    )
    p.add_argument("--batch-latency", type=float, default=0.5, help="fake engine s per batch")
    p.add_argument("--load-s", type=float, default=1.5, help="fake engine load: start-up window")
    p.add_argument("--min-gap", type=float, default=0.5, help="seconds between kills, at least")
    p.add_argument("--max-gap", type=float, default=2.5, help="... and at most")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"what a kill may hit, a comma list of {'/'.join(PHASES)} (actor: a working one)",
    )
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=bench_chaos)
