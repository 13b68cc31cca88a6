"""``qvl-batch submit`` and ``qvl-batch jobs``: run a job on a Ray cluster through the Ray Jobs API.

The job config is resolved here first, so a bad config never leaves this machine. The job file's
folder travels as the job's ``working_dir``, this ``qvl_batch`` package (with ``conf/`` and
``jobs/`` inside it) as a ``py_module``, and the entrypoint is ``qvl-batch run`` joining the
cluster (``cluster.address=auto``). Cancelling stops the entrypoint; committed units stay in the
output and a later run or submit of the same job resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, StorageConfig, conf_dir
from ..errors import Exit, SubmitError
from ..run.validate import load_job

log = logging.getLogger("qvl_batch")

# Submission metadata keys: how `jobs status` finds the job's output ledger again.
META_JOB = "qvl_batch.job"
META_JOB_FILE = "qvl_batch.job_file"
META_OUTPUT = "qvl_batch.output"
META_ENDPOINT = "qvl_batch.endpoint_url"

# Left out of the uploaded working_dir (Ray also honours .gitignore and .rayignore there):
# environments, caches, datasets and weights. Inputs and outputs belong on shared storage.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv*",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "node_modules",
    "data",
    "demo-data",
    "demo-output",
    "demo-model",
    "bench-out",
    "*.parquet",
    "*.safetensors",
]
PROBE_TIMEOUT_S = 10  # the first request to the Jobs API; a dead address fails in this long
POLL_S = 1.0
STOP_WAIT_S = 60  # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s)
ACTORS_GONE_WAIT_S = 30  # the job's actors die with its driver; this is how long we watch
MESSAGE_LINES = 12  # of a job's status message in `jobs status`; `jobs logs` has the rest
ADDRESS_HELP = (
    "the Ray dashboard of the head node, e.g. http://HEAD:8265 (default: $RAY_ADDRESS); "
    "a GCS address HOST:6379 or ray://HOST:10001 also works"
)


@dataclass
class Submission:
    """What is sent to the Jobs API for one job."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]


# ---- building a submission -----------------------------------------------------------------
def plan_submission(
    job_file: str | Path,
    overrides: list[str],
    working_dir: str | Path | None = None,
    pip: list[str] | None = None,
    submission_id: str | None = None,
) -> Submission:
    """Resolve the job locally (raises ConfigError) and build the submission.

    ``runtime_env["py_modules"]`` is left for :func:`shipped_package` to fill in.
    """
    job_path = Path(job_file).resolve()
    cfg = load_job(job_path, [*overrides, "cluster.address=auto"])
    wd = Path(working_dir).resolve() if working_dir else job_path.parent
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {wd}: not a folder")
    try:
        rel = job_path.relative_to(wd)
    except ValueError:
        raise ConfigError(
            f"the job file {job_path} is not inside the working dir {wd}: only the working dir "
            "travels to the cluster"
        ) from None
    excluded = [p for p in rel.parts if any(fnmatch.fnmatch(p, x) for x in WORKING_DIR_EXCLUDES)]
    if excluded:
        raise ConfigError(
            f"the job file {rel} would be left out of the upload ({excluded[0]!r} matches one "
            f"of {WORKING_DIR_EXCLUDES}); move it or pick another --working-dir"
        )
    if _is_relative_local(cfg.output.path):
        raise ConfigError(
            f"output.path {cfg.output.path!r} is relative: on the cluster it would land in the "
            "job's temporary working dir. Use a URL (s3://...) or an absolute path on shared "
            "storage"
        )
    for path in [*cfg.input.paths, cfg.input.manifest or ""]:
        if path and _is_relative_local(path):
            log.warning(
                "input path %r is relative: on the cluster it resolves inside the uploaded "
                "working dir (which leaves out data/ and *.parquet)",
                path,
            )
    entrypoint = shlex.join(
        [
            "python",
            "-m",
            "qvl_batch.cli",
            "run",
            rel.as_posix(),
            *overrides,
            "cluster.address=auto",  # join the cluster the job runs in, never start a Ray
            "--no-progress",
        ]
    )
    runtime_env: dict = {"working_dir": str(wd), "excludes": list(WORKING_DIR_EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {
        META_JOB: cfg.job.name,
        META_JOB_FILE: rel.as_posix(),
        META_OUTPUT: cfg.output.path,
    }
    if cfg.storage.endpoint_url:
        metadata[META_ENDPOINT] = cfg.storage.endpoint_url
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", cfg.job.name).strip("-") or "job"
    now = dt.datetime.now(dt.timezone.utc)
    sid = submission_id or f"{slug}-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    return Submission(sid, entrypoint, runtime_env, metadata)


def _is_relative_local(path: str) -> bool:
    return "://" not in path and not Path(path).is_absolute()


@contextlib.contextmanager
def shipped_package() -> Iterator[Path]:
    """A temporary copy of this ``qvl_batch`` package with ``conf/`` and ``jobs/`` inside it.

    In a repo checkout they sit next to the package; ``conf_dir()`` on the cluster finds them
    only inside it (as in an installed wheel). The copy is removed on exit; Ray has uploaded it
    by then (packages are content-addressed, so an unchanged copy is not uploaded twice).
    """
    pkg = Path(__file__).resolve().parents[1]  # qvl_batch/, this module is in commands/
    with tempfile.TemporaryDirectory(prefix="qvl-batch-ship-") as tmp:
        dst = Path(tmp) / pkg.name
        shutil.copytree(pkg, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name, src in (("conf", conf_dir()), ("jobs", pkg.parent / "jobs")):
            if not (dst / name).is_dir() and src.is_dir():
                shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        yield dst


# ---- talking to the Jobs API -------------------------------------------------------------
@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an address given in code; here the
    address we resolved (``--address``, else RAY_ADDRESS) must win, so hide them meanwhile."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _unreachable(address: str, cause: object) -> SubmitError:
    return SubmitError(
        f"cannot reach the Ray Jobs API at {address}: {cause}\n"
        "  check: the address is the head's dashboard (http://HEAD:8265, or RAY_ADDRESS); the "
        "head runs a dashboard (ray start --head --include-dashboard true, with ray[default] "
        "installed); and this machine can reach that host and port (firewall, port-forward)"
    )


def connect(address: str | None):
    """A ``JobSubmissionClient`` for ``address``; raises SubmitError when it cannot answer."""
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) "
            "or set RAY_ADDRESS"
        )
    try:
        import requests
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise SubmitError(
            "the Ray Jobs client needs ray[default]: pip install 'ray[default]'"
        ) from None
    if address.startswith(("http://", "https://")):
        # Ray's own version check has no timeout: probe first so a dead host fails quickly.
        try:
            requests.get(f"{address.rstrip('/')}/api/version", timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as exc:
            raise _unreachable(address, f"no answer ({type(exc).__name__})") from None
    with _explicit_address():
        try:
            return JobSubmissionClient(address)
        except Exception as exc:  # connection, version, auth and address errors alike
            raise _unreachable(address, exc) from None


def _call(what: str, fn, *args, **kwargs):
    """One Jobs API request; its failures (unknown id, refused request) become SubmitError."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        text = str(exc).strip()
        if what != "submit" and ("404" in text or "does not exist" in text):
            text = "no such job on this cluster (see `qvl-batch jobs list`)"
        raise SubmitError(f"{what}: {text}") from None


def submit(client, submission: Submission, ship_code: bool = True) -> str:
    """Send ``submission``; returns the submission id."""
    env = dict(submission.runtime_env)
    with contextlib.ExitStack() as stack:
        if ship_code:
            env["py_modules"] = [str(stack.enter_context(shipped_package()))]
        return _call(
            "submit",
            client.submit_job,
            entrypoint=submission.entrypoint,
            runtime_env=env,
            metadata=submission.metadata,
            submission_id=submission.submission_id,
        )


def outcome_code(info) -> int:
    """The exit code a finished job maps to, as ``qvl-batch run`` would have exited."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return Exit.OK
    if status == "STOPPED":
        return Exit.INTERRUPTED
    return info.driver_exit_code or Exit.FAILED


def wait_terminal(client, sid: str, timeout: float | None = None):
    """Job details once it has finished (or when ``timeout`` runs out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = _call("status", client.get_job_info, sid)
        if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(POLL_S)


def follow(client, sid: str) -> int:
    """Stream the job's logs to stdout until it ends; the job's outcome as an exit code."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {sid} keeps running on the cluster "
            f"(cancel it with: qvl-batch jobs cancel {sid} --address ...)",
            file=sys.stderr,
        )
        return Exit.INTERRUPTED
    except Exception as exc:  # the stream broke: the job's status still tells how it ended
        log.warning("log stream ended early (%s); waiting for the job to finish", exc)
    info = wait_terminal(client, sid)
    first = (info.message or "").strip().splitlines()[:1]  # the rest repeats the log tail
    print(f"job {sid}: {info.status}  {' '.join(first)}".rstrip(), file=sys.stderr)
    return outcome_code(info)


def live_actors(client, ray_job_id: str | None) -> list[dict] | None:
    """The job's actors that are not dead yet; None when the state API cannot tell."""
    if not ray_job_id:
        return []
    try:
        from ray.util.state import list_actors

        with _explicit_address():
            actors = list_actors(
                address=client.get_address(),
                filters=[("job_id", "=", ray_job_id)],
                limit=10_000,
                raise_on_missing_output=False,
            )
    except Exception as exc:
        log.debug("state API: %s", exc)
        return None
    return [
        {"class_name": a.class_name, "state": a.state, "actor_id": a.actor_id}
        for a in actors
        if a.state != "DEAD"
    ]


# ---- commands ------------------------------------------------------------------------------
def _utc(ms: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A Jobs API time (ms since the epoch) as UTC text."""
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc):{fmt}}Z" if ms else "-"


def cmd_submit(args: argparse.Namespace) -> int:
    submission = plan_submission(
        args.job,
        list(args.overrides),
        working_dir=args.working_dir,
        pip=args.pip,
        submission_id=args.submission_id,
    )
    if args.dry_run:
        plan = {**submission.__dict__, "ship_code": not args.no_ship_code}
        print(json.dumps(plan, indent=2))
        return Exit.OK
    client = connect(args.address)
    sid = submit(client, submission, ship_code=not args.no_ship_code)
    print(f"submitted {sid} to {args.address} (job {submission.metadata[META_JOB]})")
    print(f"  output:  {submission.metadata[META_OUTPUT]}")
    a = shlex.quote(args.address)
    print(f"  status:  qvl-batch jobs status {sid} --address {a}")
    print(f"  logs:    qvl-batch jobs logs {sid} --address {a} --follow")
    print(f"  cancel:  qvl-batch jobs cancel {sid} --address {a}", flush=True)
    if args.wait:
        return follow(client, sid)
    return Exit.OK


def status_lines(client, sid: str) -> list[str]:
    """The Ray job's status and message, then the output ledger's counts where it is known."""
    info = _call("status", client.get_job_info, sid)
    meta = info.metadata or {}
    when = " ".join(
        f"{k} {_utc(t)}" for k, t in (("started", info.start_time), ("ended", info.end_time)) if t
    )
    name = meta.get(META_JOB)
    lines = [f"submission {sid}: {info.status}" + (f"  (job {name})" if name else "")]
    if info.message:
        message = info.message.strip().splitlines()
        if len(message) > MESSAGE_LINES:  # a failed job's message carries its log tail
            message = [*message[:1], "...", *message[-(MESSAGE_LINES - 2) :]]
        lines.append("  message: " + "\n    ".join(message))
    if info.driver_exit_code is not None:
        lines.append(f"  driver exit code: {info.driver_exit_code}")
    if when:
        lines.append(f"  {when}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    output = meta.get(META_OUTPUT)
    if output:
        lines.append(f"  output: {output}")
        lines.extend(_ledger_lines(output, meta.get(META_ENDPOINT)))
    return lines


def _ledger_lines(output: str, endpoint_url: str | None) -> list[str]:
    from ..output.state import NotAJobOutput
    from ..storage import StorageError
    from .status import job_status

    storage = StorageConfig(endpoint_url=endpoint_url) if endpoint_url else None
    try:
        report = job_status(output, storage)
    except NotAJobOutput:
        return ["  ledger: nothing committed yet (no _job.json)"]
    except (StorageError, OSError, ValueError) as exc:
        return [f"  ledger: cannot be read from here ({exc})"]
    return ["  ledger: " + report.lines()[0], *("  " + ln for ln in report.lines()[1:])]


def cmd_jobs_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(connect(args.address), args.id)))
    return Exit.OK


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        return follow(client, args.id)
    sys.stdout.write(_call("logs", client.get_job_logs, args.id))
    return Exit.OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if not _call("cancel", client.stop_job, args.id):
        info = _call("status", client.get_job_info, args.id)
        print(f"job {args.id} is not running ({info.status}); nothing to cancel")
        return Exit.OK
    print(f"cancel requested for {args.id}; the driver gets SIGTERM, then SIGKILL")
    info = wait_terminal(client, args.id, timeout=STOP_WAIT_S)
    print(f"job {args.id}: {info.status}")
    deadline = time.monotonic() + ACTORS_GONE_WAIT_S
    while (alive := live_actors(client, info.job_id)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if alive is None:
        print("  actors: cannot tell (no state API); Ray ends them with their driver")
    elif alive:
        names = ", ".join(sorted({a["class_name"] for a in alive}))
        print(f"  actors: {len(alive)} still alive after {ACTORS_GONE_WAIT_S}s ({names})")
    else:
        print("  actors: all gone")
    meta = info.metadata or {}
    print(
        "  committed units are kept in the output; submit the same job again (or "
        f"`qvl-batch run {meta.get(META_JOB_FILE, 'JOB')}`) to resume"
    )
    return Exit.OK


def cmd_jobs_list(args: argparse.Namespace) -> int:
    client = connect(args.address)
    jobs = [j for j in _call("list", client.list_jobs) if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "JOB", "STARTED", "OUTPUT")]
    for j in jobs:
        meta = j.metadata or {}
        started = _utc(j.start_time, "%Y-%m-%d %H:%M")
        name, output = meta.get(META_JOB, "-"), meta.get(META_OUTPUT, "-")
        rows.append((j.submission_id, str(j.status), name, started, output))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return Exit.OK


def _guarded(fn):
    """Unreachable clusters and refused requests: a message and exit 2, as for a bad config."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except SubmitError as exc:
            print(f"qvl-batch: error: {exc}", file=sys.stderr)
            return Exit.CONFIG

    return run


def add_submit_parser(sub) -> None:
    """Add ``submit JOB ...`` and ``jobs status|logs|cancel|list`` to an argparse subparsers."""
    address = {"default": os.environ.get("RAY_ADDRESS"), "help": ADDRESS_HELP}

    p = sub.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    p.add_argument("job", help="job YAML file; its folder is uploaded as the working dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--address", **address)
    p.add_argument("--working-dir", help="folder to upload (must hold the job file)")
    p.add_argument(
        "--pip", action="append", default=[], metavar="PKG", help="a pip package (repeatable)"
    )
    p.add_argument(
        "--no-ship-code",
        action="store_true",
        help="use the qvl_batch installed on the cluster instead of uploading this one",
    )
    p.add_argument("--submission-id", help="default: <job name>-<UTC time>-<random>")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit as the job ends")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    p.set_defaults(func=_guarded(cmd_submit))

    jobs = sub.add_parser("jobs", help="status, logs, cancel or list submitted jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    commands = (
        ("status", "Ray status and message, and the output ledger's counts", cmd_jobs_status),
        ("logs", "the job's driver output", cmd_jobs_logs),
        ("cancel", "stop the job; committed units are kept", cmd_jobs_cancel),
        ("list", "submitted jobs on the cluster", cmd_jobs_list),
    )
    for name, text, fn in commands:
        q = jsub.add_parser(name, help=text)
        if name != "list":
            q.add_argument("id", help="submission id (printed by `qvl-batch submit`)")
        q.add_argument("--address", **address)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.set_defaults(func=_guarded(fn))
