"""Manifest and planner: list the input shards, fingerprint them, cut them into work units.

A work unit is a contiguous row range of one shard, made of whole row groups where they fit
under the job's unit size (a larger row group is cut into equal slices). The unit size is
``batching.unit_rows``, lowered for a small job so every actor gets units
(:func:`sized_unit_rows`). Unit ids are ``<shard index>-<unit index>``, zero-padded, stable for a
given input and unit size: the input fingerprint guards the input under a resumed job, and
``_job.json`` keeps the unit size its first run chose (:func:`job_unit_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from ..errors import InputError
from ..storage import Storage, StorageError, bucket_of, describe, full_url
from .prompts import template_fields

GLOB_CHARS = "*?["
FOOTER_THREADS = 16  # footers are tiny reads; this bounds open connections, not memory
# A small job's units are cut smaller so each expected actor gets about min_units_per_actor,
# never below this: a unit costs a commit (two part files and a marker) whatever its size.
MIN_UNIT_ROWS = 16
# Actors expected when the config does not say (cluster.num_actors=0 on a cluster Ray has not
# been asked about yet): a guess; more units than actors cost a commit each, fewer idle actors.
ACTORS_GUESS = 8
IMAGE_TYPES_ALLOWED = (
    "binary or large_binary (encoded image bytes), string or large_string (a URI or path), or "
    "a struct with a bytes and/or path field (Hugging Face datasets' Image)"
)


@dataclass(frozen=True)
class Shard:
    index: int
    url: str
    size: int
    version: str  # etag or mtime: what changes when the object is rewritten
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_start + num_rows)`` of one shard."""

    unit_id: str
    shard_index: int
    shard_url: str
    row_start: int
    num_rows: int


@dataclass
class Plan:
    shards: list[Shard]
    fingerprint: str
    unit_rows: int  # the unit size units are cut at (a resumed job's: _job.json's)
    image_kind: str = "bytes"  # the image column's kind in the first shard: image_kind()

    @property
    def total_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def units(self) -> Iterator[WorkUnit]:
        """Units in shard order, generated lazily (memory O(row groups), not O(units))."""
        for shard in self.shards:
            yield from cut_units(shard, self.unit_rows)

    def num_units(self) -> int:
        return sum(1 for _ in self.units())


def cut_units(shard: Shard, unit_rows: int) -> Iterator[WorkUnit]:
    """Group whole row groups up to ``unit_rows``; slice row groups larger than that."""
    ranges: list[tuple[int, int]] = []
    start = pos = 0
    for n in shard.row_group_rows:
        if n > unit_rows:
            if pos > start:
                ranges.append((start, pos - start))
            slices = -(-n // unit_rows)
            step = -(-n // slices)
            ranges.extend((pos + k, min(step, n - k)) for k in range(0, n, step))
            start = pos = pos + n
            continue
        if pos + n - start > unit_rows and pos > start:
            ranges.append((start, pos - start))
            start = pos
        pos += n
    if pos > start:
        ranges.append((start, pos - start))
    for k, (row_start, num_rows) in enumerate(ranges):
        if num_rows:
            yield WorkUnit(
                f"{shard.index:05d}-{k:05d}", shard.index, shard.url, row_start, num_rows
            )


def _read_manifest(url: str, storage: Storage) -> list[str]:
    try:
        text = storage.cat(url).decode()
    except FileNotFoundError:
        raise InputError(f"input.manifest: {url} does not exist") from None
    except (OSError, StorageError) as exc:
        raise InputError(f"input.manifest: cannot read {url}: {describe(exc)}") from None
    if text.lstrip().startswith("["):
        entries = json.loads(text)
    else:
        entries = [ln.strip() for ln in text.splitlines()]
    return [e for e in entries if e and not e.startswith("#")]


def _match(storage: Storage, fs, path: str) -> list[str]:
    if any(c in path for c in GLOB_CHARS):
        listed = storage.call(f"list {path}", fs.glob, path, detail=True)
        return sorted(p for p, info in listed.items() if info.get("type") != "directory")
    if storage.call(f"stat {path}", fs.isdir, path):
        found = storage.call(f"list {path}", fs.find, path)
        return sorted(p for p in found if p.endswith(".parquet"))
    return [path] if storage.call(f"stat {path}", fs.exists, path) else []


def _no_match_reason(storage: Storage, fs, pattern: str, path: str) -> str:
    """Why nothing matched: a missing or forbidden bucket says so instead of 'no files'."""
    bucket = bucket_of(fs, path)
    if bucket:
        try:
            storage.call(f"stat bucket {bucket}", fs.info, bucket)
        except FileNotFoundError:
            return f"input: bucket {bucket!r} does not exist (from {pattern!r})"
        except (OSError, StorageError) as exc:
            return f"input: cannot open bucket {bucket!r} (from {pattern!r}): {describe(exc)}"
    return f"input: no Parquet files match {pattern!r}"


def list_shard_urls(cfg: Config, storage: Storage) -> list[tuple[object, str]]:
    """Every Parquet shard the input names, as (filesystem, path), sorted and de-duplicated."""
    patterns = list(cfg.input.paths)
    if cfg.input.manifest:
        patterns += _read_manifest(cfg.input.manifest, storage)
    found: dict[str, tuple[object, str]] = {}
    for pattern in patterns:
        fs, path = storage.fs(pattern)
        try:
            matches = _match(storage, fs, path)
        except (OSError, StorageError) as exc:
            raise InputError(f"input: cannot list {pattern}: {describe(exc)}") from None
        if not matches:
            raise InputError(_no_match_reason(storage, fs, pattern, path))
        for p in matches:
            found[full_url(fs, p)] = (fs, p)
    return [found[k] for k in sorted(found)]


def _shard_info(index: int, fs, path: str, storage: Storage) -> tuple[Shard, object]:
    try:
        info = storage.call(f"stat {path}", fs.info, path)
        with storage.open_input(fs, path, int(info.get("size") or 0) or None) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as exc:
        raise InputError(
            f"input: cannot read the Parquet footer of {full_url(fs, path)}: {describe(exc)}"
        ) from None
    version = next(
        (
            str(info[k])
            for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated")
            if info.get(k) is not None
        ),
        "",
    )
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return Shard(index, full_url(fs, path), int(info.get("size") or 0), version, rows), meta


def required_columns(cfg: Config) -> list[str]:
    cols = [cfg.input.image_column]
    if cfg.input.id_column:
        cols.append(cfg.input.id_column)
    if cfg.input.prompt_column:
        cols.append(cfg.input.prompt_column)
    else:
        cols += template_fields(cfg.prompt.template)
    cols += list(cfg.input.passthrough_columns)
    return list(dict.fromkeys(cols))


def image_kind(dtype: pa.DataType) -> str | None:
    """``bytes``, ``uri``, ``struct`` (with a bytes field) or ``path`` (a struct of a path
    only) for an image column's Arrow type; None for a type the reader cannot take an image
    from (an int64 column would make every row MISSING_IMAGE)."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return "bytes"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "uri"
    if pa.types.is_struct(dtype):
        names = {f.name for f in dtype}
        return "struct" if "bytes" in names else "path" if "path" in names else None
    return None


def expected_actors(cfg: Config) -> int:
    """Actors the job expects before Ray is asked: cluster.num_actors, a local Ray's declared
    GPUs, else :data:`ACTORS_GUESS`."""
    c = cfg.cluster
    if c.num_actors:
        return c.num_actors
    if not c.address and c.local_num_gpus and c.num_gpus_per_actor > 0:
        return max(1, int(c.local_num_gpus // c.num_gpus_per_actor))
    return ACTORS_GUESS


def sized_unit_rows(cfg: Config, total_rows: int) -> int:
    """batching.unit_rows, lowered for a small job so each expected actor gets about
    batching.min_units_per_actor units (202 rows on 2 actors: 4 units of 51, not one of 202
    run by one actor while the other runs a backup copy), never below MIN_UNIT_ROWS."""
    target, per = cfg.batching.unit_rows, cfg.batching.min_units_per_actor
    if not per or total_rows <= 0:
        return target
    cap = -(-total_rows // (per * expected_actors(cfg)))
    return min(target, max(cap, MIN_UNIT_ROWS))


def job_unit_rows(job: dict, cfg: Config) -> int:
    """The unit size a job's output was planned with: ``_job.json``'s ``unit_rows``, or
    batching.unit_rows for outputs written before it was recorded (they were cut at that)."""
    return int(job.get("unit_rows") or cfg.batching.unit_rows)


def _check_columns(cfg: Config, shard: Shard, meta) -> str:
    """The image column's kind; an InputError if a column is missing or the image column's
    type holds no image."""
    schema = meta.schema.to_arrow_schema()
    missing = [c for c in required_columns(cfg) if c not in schema.names]
    if missing:
        raise InputError(
            f"input: {shard.url} lacks column(s) {missing}; it has {sorted(schema.names)}. "
            "Set input.id_column / input.image_column / input.prompt_column or fix the "
            "prompt template fields."
        )
    column = cfg.input.image_column
    dtype = schema.field(column).type
    kind = image_kind(dtype)
    if kind is None:
        raise InputError(
            f"input.image_column: column {column!r} of {shard.url} is {dtype}, which holds no "
            f"image; it must be {IMAGE_TYPES_ALLOWED}. Set input.image_column to the column "
            "that holds the images."
        )
    return kind


def plan_job(cfg: Config, storage: Storage | None = None, unit_rows: int | None = None) -> Plan:
    """List, open and fingerprint the input; check the columns the job needs exist and the
    image column holds images. Units are cut at ``unit_rows`` (a resumed job's), else at
    :func:`sized_unit_rows`."""
    storage = storage or Storage.for_input(cfg)
    listed = list_shard_urls(cfg, storage)
    with ThreadPoolExecutor(min(FOOTER_THREADS, max(1, len(listed)))) as pool:
        infos = list(pool.map(lambda a: _shard_info(a[0], *a[1], storage), enumerate(listed)))
    kinds = [_check_columns(cfg, shard, meta) for shard, meta in infos]
    shards = [s for s, _ in infos]
    digest = hashlib.sha256()
    for s in shards:
        digest.update(f"{s.url}\0{s.size}\0{s.version}\0{s.num_rows}\n".encode())
    rows = sum(s.num_rows for s in shards)
    size = unit_rows or sized_unit_rows(cfg, rows)
    return Plan(shards, digest.hexdigest()[:16], size, kinds[0] if kinds else "bytes")
