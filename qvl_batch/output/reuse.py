"""Incremental runs: results of earlier outputs carried over by result key.

Every data row carries ``result_key``: a sha256 over the image's content hash, the system
prompt, the row's prompt and the settings that decide a result (model, engine, dtype, sampling,
image and structured-output settings; :func:`.fingerprint.result_settings`). A job with
``reuse.outputs`` reads only that column of the earlier outputs' data files and builds a compact
index (8-byte key prefix -> file, row; about 16 bytes a row), shipped once to every actor
through Ray's object store. An actor hashes each row's image bytes before decoding; on a hit
it reads the earlier row (the file is cached) and checks the full key, then the row is
carried over without decoding or generating. Error rows are never reused: they run again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ..config import Config, ConfigError
from ..storage import Storage
from .fingerprint import result_settings
from .state import DATA_DIR, NotAJobOutput, OutputState

log = logging.getLogger("qvl_batch")

READ_THREADS = 8
CACHED_FILES = 8  # earlier part files an actor keeps decoded (a unit's hits share a few)


def settings_digest(cfg: Config) -> str:
    blob = json.dumps(result_settings(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def result_key(image_sha256: str, system: str | None, prompt: str, settings: str) -> str:
    """The key a row's result is found by (hex, 32 characters)."""
    blob = f"{image_sha256}\0{system or ''}\0{prompt}\0{settings}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _prefix(key: str) -> np.uint64:
    return np.uint64(int(key[:16], 16))


@dataclass
class ReuseIndex:
    """Earlier data rows by result key: sorted 8-byte prefixes with (file, row) per entry."""

    files: list[str]  # URLs of earlier data files
    jobs: list[str]  # the job id each file belongs to
    keys: np.ndarray  # uint64, sorted
    file_of: np.ndarray  # int32
    row_of: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.keys)

    def candidates(self, key: str) -> list[tuple[int, int]]:
        """(file, row) of every entry whose prefix matches ``key`` (almost always 0 or 1)."""
        k = _prefix(key)
        i = int(np.searchsorted(self.keys, k, side="left"))
        out = []
        while i < len(self.keys) and self.keys[i] == k:
            out.append((int(self.file_of[i]), int(self.row_of[i])))
            i += 1
        return out


class ReuseReader:
    """An actor's side: look a key up and read the earlier row (files cached, thread-safe)."""

    def __init__(self, index: ReuseIndex, storage: Storage):
        self.index = index
        self.storage = storage
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def _rows(self, file: int) -> list[dict]:
        with self._lock:
            if file in self._cache:
                self._cache.move_to_end(file)
                return self._cache[file]
        blob = self.storage.cat(self.index.files[file])
        rows = pq.read_table(io.BytesIO(blob)).to_pylist()
        with self._lock:
            self._cache[file] = rows
            while len(self._cache) > CACHED_FILES:
                self._cache.popitem(last=False)
        return rows

    def find(self, key: str) -> tuple[dict, str] | None:
        """(the earlier data row, its job id) for ``key``, or None."""
        for file, row in self.index.candidates(key):
            found = self._rows(file)[row]
            if found.get("result_key") == key:
                return found, self.index.jobs[file]
        return None


def build_index(cfg: Config, storage: Storage | None = None) -> ReuseIndex | None:
    """Read the result keys of ``reuse.outputs``; None when there is nothing to reuse.

    Raises ConfigError (before any work) for a path that is not a job output (unless
    ``reuse.if_missing`` is ``skip``: then it is left out with a warning) or whose data files
    predate result keys.
    """
    if not cfg.reuse.outputs:
        return None
    storage = storage or Storage.for_output(cfg)
    files: list[tuple[OutputState, str, str]] = []  # (state, relative path, job id)
    for i, url in enumerate(cfg.reuse.outputs):
        if url.rstrip("/") == cfg.output.path.rstrip("/"):
            raise ConfigError(
                f"reuse.outputs[{i}]: {url} is this job's own output.path; a resumed run "
                "already keeps its committed rows. Name earlier outputs only."
            )
        state = OutputState(url, storage)
        try:
            job = state.require_job()
        except NotAJobOutput as exc:
            if cfg.reuse.if_missing == "skip":
                log.warning("reuse.outputs[%d]: %s; skipped (reuse.if_missing=skip)", i, exc)
                continue
            raise ConfigError(
                f"reuse.outputs[{i}]: {exc} (reuse.if_missing=skip goes on without it)"
            ) from None
        for marker in state.markers():
            for rel in marker.files:
                if rel.startswith(f"{DATA_DIR}/"):
                    files.append((state, rel, str(job.get("job_id"))))

    def keys_of(item: tuple[OutputState, str, str]) -> np.ndarray:
        state, rel, _ = item
        pf = pq.ParquetFile(io.BytesIO(state.read_path(state.path(rel))))
        if "result_key" not in pf.schema_arrow.names:
            raise ConfigError(
                f"reuse: {state.url}/{rel} has no result_key column (written by a qvl-batch "
                "before 0.2); it cannot be reused. Remove it from reuse.outputs."
            )
        column = pf.read(columns=["result_key"]).column(0).to_pylist()
        return np.array([int(k[:16], 16) if k else 0 for k in column], dtype=np.uint64)

    if not files:
        log.info("reuse: no earlier results to index")
        return None
    with ThreadPoolExecutor(READ_THREADS) as pool:
        per_file = list(pool.map(keys_of, files))
    sizes = [len(k) for k in per_file]
    keys = np.concatenate(per_file) if per_file else np.zeros(0, np.uint64)
    file_of = np.repeat(np.arange(len(files), dtype=np.int32), sizes)
    row_of = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes] or [np.zeros(0, int)])
    order = np.argsort(keys, kind="stable")
    index = ReuseIndex(
        files=[f"{state.url.rstrip('/')}/{rel}" for state, rel, _ in files],
        jobs=[job for _, _, job in files],
        keys=keys[order],
        file_of=file_of[order],
        row_of=row_of[order].astype(np.int32),
    )
    log.info(
        "reuse: %s earlier results indexed from %d outputs (%d files)",
        f"{len(index):,}",
        len(cfg.reuse.outputs),
        len(files),
    )
    return index
