"""The output folder as a ledger: what job it belongs to and which units are committed.

Layout (a contract, documented in the README)::

    _job.json                     resolved config (redacted), fingerprint, job id, versions
    _state/units/<unit>.json      one marker per committed unit, written after its part files
    data/part-<unit>.parquet      successful rows of a unit
    errors/part-<unit>.parquet    failed rows of a unit
    data/part-<unit>.retry-<n>.parquet    rows that `retry-failed` turned into data (pass n)
    errors/part-<unit>.retry-<n>.parquet  the unit's errors still failing after pass n (the
                                          marker names the files that hold the unit's rows)
    _metrics.json                 throughput, errors, timings
    _SUCCESS                      written last
    _lease.json                   while a driver runs (output/lease.py): who, and its heartbeat

A unit is committed iff its marker exists. Part files without a marker are leftovers of a run
that died mid-commit; they are deleted before a resumed run starts.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from ..errors import NotAJobOutput, ResumeRefused
from ..storage import Storage, StorageError, atomic_write, describe, is_temporary, join
from .fingerprint import same_but_relative_model
from .marker import Marker

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
METRICS_FILE = "_metrics.json"
REPORT_FILE = "_report.html"
UNITS_DIR = "_state/units"
DATA_DIR = "data"
ERRORS_DIR = "errors"
LEASE_FILE = "_lease.json"  # output/lease.py
BATCH_FILES = ("batch_output.jsonl", "batch_errors.jsonl")  # output/batch_files.py
# What a job writes at the top of its output folder.
OWN_FILES = frozenset(
    {JOB_FILE, SUCCESS_FILE, METRICS_FILE, REPORT_FILE, LEASE_FILE, "_state", DATA_DIR, ERRORS_DIR}
    | set(BATCH_FILES)
)


log = logging.getLogger("qvl_batch")

MARKER_READ_THREADS = 16  # small GETs in parallel: object stores answer each in ~10-50 ms


def _leaf_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _leaf_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


RETRY_TAG = ".retry-"


def _part(sub: str, unit_id: str, retry: int) -> str:
    return posixpath.join(sub, f"part-{unit_id}{f'{RETRY_TAG}{retry}' if retry else ''}.parquet")


def data_file(unit_id: str, retry: int = 0) -> str:
    return _part(DATA_DIR, unit_id, retry)


def errors_file(unit_id: str, retry: int = 0) -> str:
    return _part(ERRORS_DIR, unit_id, retry)


def unit_id_of(filename: str) -> str | None:
    name = posixpath.basename(filename)
    if name.startswith("part-") and name.endswith(".parquet"):
        return name[len("part-") : -len(".parquet")].split(RETRY_TAG)[0]
    if name.endswith(".json") and posixpath.dirname(filename).endswith(UNITS_DIR):
        return name[: -len(".json")]
    return None


class OutputState:
    """Reads and writes the ledger files of one output folder (any fsspec URL).

    Every request is retried on transient errors (see :class:`Storage`); a permanent one
    (no such bucket, access denied) becomes a :class:`StorageError` naming the path.
    """

    def __init__(self, url: str, storage: Storage | None = None):
        self.url = url
        self.storage = storage or Storage()
        self.fs, self.root = self.storage.fs(url)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _call(self, verb: str, name: str, fn, *args, **kwargs):
        what = f"output.path {self.url}: {verb} {name}"
        try:
            return self.storage.call(what, fn, *args, **kwargs)
        except StorageError:
            raise
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{what}: {describe(exc)}") from None

    def read_path(self, path: str) -> bytes:
        """The bytes of one file under the output (a path from the listings)."""
        return self._call("read", path, self.fs.cat_file, path)

    def _read_json(self, name: str) -> dict | None:
        try:
            blob = self._call("read", name, self.fs.cat_file, self.path(name))
        except FileNotFoundError:
            return None
        return json.loads(blob)

    def write_json(self, name: str, value: dict) -> None:
        # Insertion order kept: a structured-output schema's property order is its column order.
        blob = json.dumps(value, indent=2, default=str).encode()
        self.write_bytes(name, blob)

    def write_bytes(self, name: str, blob: bytes) -> None:
        """Write one output file atomically (retried); raises StorageError naming it."""
        try:
            self._call("write", name, atomic_write, self.fs, self.path(name), blob)
        except FileNotFoundError as exc:  # e.g. the bucket does not exist
            raise StorageError(f"output.path {self.url}: write {name}: {describe(exc)}") from None

    def job(self) -> dict | None:
        return self._read_json(JOB_FILE)

    def require_job(self) -> dict:
        """``_job.json``; raises NotAJobOutput where there is none (or it is not JSON)."""
        try:
            job = self.job()
        except ValueError:
            raise NotAJobOutput(f"{self.url}: {JOB_FILE} is not valid JSON") from None
        if not isinstance(job, dict):
            raise NotAJobOutput(
                f"{self.url}: no {JOB_FILE}: this is not the output of a qvl-batch job"
            )
        return job

    def success(self) -> dict | None:
        return self._read_json(SUCCESS_FILE)

    def metrics(self) -> dict | None:
        """``_metrics.json``: present once a run has ended (succeeded or failed)."""
        return self._read_json(METRICS_FILE)

    def entries(self) -> list[str]:
        """Names at the top of the output folder, hidden ones and temporaries left out; empty
        when the folder does not exist."""
        try:
            found = self._call("list", "/", self.fs.ls, self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in found]
        return [n for n in names if n and not n.startswith(".") and not is_temporary(n)]

    def _list(self, sub: str) -> list[str]:
        try:
            # refresh: object-store listings are cached per filesystem instance.
            return self._call("list", sub, self.fs.ls, self.path(sub), detail=False, refresh=True)
        except FileNotFoundError:
            return []

    def remove(self, paths: list[str]) -> None:
        """Delete files; already gone is fine. Object stores: one bulk request per 1,000."""
        if not paths:
            return
        if isinstance(self.fs, LocalFileSystem):
            for path in paths:
                try:
                    self._call("delete", path, self.fs.rm_file, path)
                except FileNotFoundError:
                    pass
            return
        try:
            self._call("delete", f"{len(paths)} files", self.fs.rm, paths)
        except FileNotFoundError:
            pass

    def marker_paths(self) -> list[str]:
        """Paths of every commit marker, sorted (a marker being written is not one yet)."""
        return sorted(
            p for p in self._list(UNITS_DIR) if p.endswith(".json") and not is_temporary(p)
        )

    def committed_units(self) -> set[str]:
        return {u for p in self.marker_paths() if (u := unit_id_of(p))}

    def marker_blobs(self) -> list[tuple[str, bytes]]:
        """(path, bytes) of every commit marker, read in parallel (one small GET each)."""
        paths = self.marker_paths()
        with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
            return list(zip(paths, pool.map(self.read_path, paths)))

    def markers(self) -> list[Marker]:
        """Every commit marker that parses; see :meth:`marker_blobs` for the rest."""
        return [m for _, blob in self.marker_blobs() if (m := Marker.parse(blob)) is not None]

    def mark_committed(self, marker: Marker) -> None:
        """The commit point of a unit: its marker, written after its part files."""
        self.write_json(posixpath.join(UNITS_DIR, f"{marker.unit_id}.json"), marker.to_json())

    def clean_orphans(self, markers: list[Marker]) -> list[str]:
        """Delete part files no marker names (a commit that died before its marker, or the
        files a retry replaced) and temporaries."""
        named = {self.path(rel) for m in markers for rel in m.files}
        committed = {m.unit_id for m in markers}
        removed = [p for sub in (DATA_DIR, ERRORS_DIR) for p in self._list(sub) if p not in named]
        removed += [
            p for p in self._list(UNITS_DIR) if is_temporary(p) or unit_id_of(p) not in committed
        ]
        self.remove(removed)
        return removed

    def wipe(self) -> None:
        """Remove a previous run's outputs (output.mode=overwrite)."""
        for name in (SUCCESS_FILE, JOB_FILE, METRICS_FILE, REPORT_FILE, *BATCH_FILES):
            self.remove([self.path(name)])
        for sub in (UNITS_DIR, DATA_DIR, ERRORS_DIR):
            self.remove(self._list(sub))

    def holds_results(self) -> bool:
        """Whether any unit was ever committed here, or began to be: a marker or a part file."""
        return any(self._list(sub) for sub in (UNITS_DIR, DATA_DIR, ERRORS_DIR))

    def check_resume(self, fingerprint: str, fields: dict) -> dict | None:
        """The earlier job's record if it may be resumed; raise ResumeRefused if it differs.

        An earlier job that committed nothing (its start failed: a bad model, a missing
        package) locks nothing: its files are removed and None returned, so the corrected job
        starts here as new."""
        job = self.job()
        if job is None:
            return None
        saved = job.get("fingerprint_fields") or {}
        changed = job.get("fingerprint") != fingerprint and not same_but_relative_model(
            saved, job.get("fingerprint"), fields
        )
        if changed and not self.holds_results():
            log.info(
                "output %s: the earlier start (job %s) committed nothing; this job replaces it",
                self.url,
                job.get("job_id"),
            )
            self.wipe()
            return None
        if changed:
            diff = _leaf_diff(job.get("fingerprint_fields", {}), fields)
            lines = "\n  ".join(diff[:20]) or "(fingerprint scheme changed)"
            raise ResumeRefused(
                f"output {self.url} holds job {job.get('job_id')} with a different config "
                f"fingerprint ({job.get('fingerprint')} there, {fingerprint} now):\n  {lines}\n"
                "Resuming would mix results of two configs. Use another output.path, or start "
                "over in this one with --fresh (output.mode=overwrite deletes its results)."
            )
        return job
