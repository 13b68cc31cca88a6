"""An existing job output opened by a later command (status, verify, retry-failed)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Config, ConfigError, StorageConfig, config_from_saved, with_absolute_paths
from ..output.saved_config import absolute_saved_paths, read_back
from ..output.state import JOB_FILE, OutputState
from ..run.validate import validate
from ..storage import Storage


@dataclass
class ExistingOutput:
    url: str
    job: dict  # _job.json
    state: OutputState  # opened with the storage that reached _job.json

    def config(self, storage_overrides: dict | None = None, overrides: list[str] | None = None):
        """The job's Config as saved, its output here (see :func:`config_from_job`)."""
        return config_from_job(self.job, self.url, storage_overrides, overrides)

    def reopened(self, cfg: Config) -> OutputState:
        """The output opened again with the job's own output storage settings."""
        return OutputState(self.url, Storage.for_output(cfg))


def open_output(
    url: str, storage: StorageConfig | None = None, storage_overrides: dict | None = None
) -> ExistingOutput:
    """The output at ``url``; raises NotAJobOutput where it holds no job, StorageError where
    ``_job.json`` cannot be read (``storage``: an endpoint or region needed to reach it)."""
    state = OutputState(url, Storage(storage, storage_overrides))
    return ExistingOutput(url, state.require_job(), state)


def config_from_job(
    job: dict,
    url: str,
    storage_overrides: dict | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The job's Config rebuilt from ``_job.json``, its output at ``url`` (where it is now),
    validated like a job file; ``overrides`` are ``key=value`` settings on top (retry-failed)."""
    saved = read_back(job.get("config") or {})
    missing = absolute_saved_paths(saved, url)  # an older output's relative paths
    saved.setdefault("output", {})["path"] = url
    try:
        cfg = with_absolute_paths(validate(config_from_saved(saved, overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{url}/{JOB_FILE}: the saved config does not load: {exc}") from None
    given = {o.split("=", 1)[0].strip() for o in overrides or []}
    missing = [(k, p) for k, p in missing if k.split("[")[0] not in given]
    if missing:
        key, path = missing[0]
        raise ConfigError(
            f"{url}/{JOB_FILE}: {key} {path!r} was saved relative (by an older qvl-batch) and "
            f"is not found from here ({os.getcwd()}) nor from where the job ran, as far as its "
            "output path tells: run this command from the directory the job ran in, or (for "
            f"retry-failed) give the input again with absolute paths ({key.split('[')[0]}=...)"
        )
    for side in (cfg.input, cfg.output):
        side.storage_options.update(storage_overrides or {})
    return cfg
