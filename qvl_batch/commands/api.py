"""The Python API, for notebooks and orchestrators: what the command line does, as calls.

    from qvl_batch.commands.api import run, read_output
    summary = run("jobs/caption.yaml", {"input.paths": ["s3://bucket/photos/"]})
    table = read_output(summary.output).to_table()

A job is a job file's path, a dict of its contents, or a loaded :class:`~qvl_batch.config.Config`;
overrides are ``key=value`` strings or a dict of dotted keys. Errors raise the same exceptions
the command line turns into exit codes (``ConfigError``, ``InputError``, ``ResumeRefused``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import Config, StorageConfig
from ..errors import NotAJobOutput

Job = str | Path | dict | Config
Overrides = list[str] | dict[str, Any] | None


def _override_list(overrides: Overrides) -> list[str]:
    if isinstance(overrides, dict):  # JSON is YAML: lists, strings and null keep their types
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return list(overrides or [])


def load(job: Job, overrides: Overrides = None):
    """The job's resolved, validated config (what ``run`` would run)."""
    from ..run.validate import load_job, validate

    if isinstance(job, Config):
        if overrides:
            raise ValueError("overrides apply to a job file or dict; change the Config itself")
        return validate(job)
    return load_job(job, _override_list(overrides))


def run(job: Job, overrides: Overrides = None, *, fresh: bool = False, progress: bool = False):
    """Run or resume the job; returns its :class:`~qvl_batch.run.driver.JobSummary`
    (``exit_code`` as the command line's). ``fresh``: discard earlier results first."""
    from ..run.driver import run_job

    if isinstance(job, Config):
        cfg = load(job, overrides)
        if fresh:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, mode="overwrite"))
    else:
        extra = ["output.mode=overwrite"] if fresh else []
        cfg = load(job, [*_override_list(overrides), *extra])
    return run_job(cfg, progress_bar=progress)


def retry_failed(output: str, overrides: Overrides = None, codes: list[str] | None = None):
    """Run a finished job's error rows again (``codes``: only those) and fold them in."""
    from .retry import RetryPass

    return RetryPass(str(output), _override_list(overrides), list(codes or []), False).run()


def verify(output: str, *, allow_incomplete: bool = False, storage: StorageConfig | None = None):
    """The output against its input; ``report.violations`` empty means the contract holds."""
    from .verify import verify_output

    return verify_output(str(output), allow_incomplete=allow_incomplete, storage=storage)


def status(output: str, storage: StorageConfig | None = None):
    """What the output's ledger says: rows done, failed, pending; errors by code."""
    from .status import job_status

    return job_status(str(output), storage)


def read_output(output: str, which: str = "data", storage: StorageConfig | None = None):
    """The committed rows of ``data`` or ``errors`` as a ``pyarrow.dataset.Dataset``: the part
    files the commit markers name, so an interrupted job's half-written parts are never read."""
    import pyarrow.dataset as ds

    from ..output.state import OutputState
    from ..storage import Storage

    if which not in ("data", "errors"):
        raise ValueError(f"which: {which!r}, not 'data' or 'errors'")
    state = OutputState(str(output), Storage(storage))
    if state.job() is None:
        raise NotAJobOutput(f"{output}: no _job.json here: not a qvl-batch output")
    files = sorted(
        state.path(rel) for m in state.markers() for rel in m.files if rel.startswith(f"{which}/")
    )
    if not files:  # nothing committed yet: an empty dataset, not an error
        import pyarrow as pa

        return ds.dataset(pa.table({"id": pa.array([], pa.string())}))
    return ds.dataset(files, format="parquet", filesystem=state.fs)


__all__ = ["load", "read_output", "retry_failed", "run", "status", "verify"]
