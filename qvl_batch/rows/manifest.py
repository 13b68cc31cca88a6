"""Manifest and planner: list the input shards, fingerprint them, cut them into work units.

A shard is one input file (Parquet, CSV, JSONL, Batch file, tar) or a slice of an image-file
listing. A work unit is a contiguous row range of one shard, made of whole row groups where they
fit under the job's unit size (a larger row group is cut into equal slices; text and tar files
have groups of GROUP_ROWS rows). The unit size is ``batching.unit_rows``, lowered for a small job
so every actor gets units (:mod:`.unit_size`). Unit ids are ``<shard index>-<unit index>``,
zero-padded, stable for a given input and unit size: the input fingerprint guards the input under
a resumed job, and ``_job.json`` keeps the unit size its first run chose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from ..errors import InputError
from ..storage import Storage, StorageError, bucket_of, describe, full_url
from . import openai_batch, sources
from .formats import Listed, decide_format, kind_of_name, list_pattern
from .prompts import template_fields
from .textfiles import GROUP_ROWS
from .unit_size import job_unit_rows, sized_unit_rows

__all__ = ["job_unit_rows", "plan_job"]  # job_unit_rows: for the commands that resume a plan

FOOTER_THREADS = 16  # footers are tiny reads; this bounds open connections, not memory
# What each non-Parquet format's image column holds (image_kind's names).
FORMAT_IMAGE_KIND = {"webdataset": "bytes"}  # the others: paths or URIs
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
    format: str = "parquet"
    offsets: tuple[int, ...] = ()  # text and tar files: byte offset of each group, then the end
    header_end: int = 0  # CSV: where the header record ends
    members: tuple[str, ...] = ()  # image files: paths relative to ``url``, one a row

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class Extent:
    """Where a text or tar unit's rows lie: the bytes of its groups, and the rows of the first
    group before its own."""

    byte_start: int
    byte_end: int
    skip_rows: int
    header_end: int = 0


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_start + num_rows)`` of one shard."""

    unit_id: str
    shard_index: int
    shard_url: str
    row_start: int
    num_rows: int
    format: str = "parquet"
    extent: Extent | None = None
    members: tuple[str, ...] = ()


@dataclass
class Plan:
    shards: list[Shard]
    fingerprint: str
    unit_rows: int  # the unit size units are cut at (a resumed job's: _job.json's)
    image_kind: str = "bytes"  # the image column's kind in the first shard: image_kind()
    format: str = "parquet"
    # Job settings the input asks for (an OpenAI Batch file's max_tokens, ...), by dotted key.
    settings: dict[str, Any] = field(default_factory=dict)

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
                f"{shard.index:05d}-{k:05d}",
                shard.index,
                shard.url,
                row_start,
                num_rows,
                shard.format,
                _extent(shard, row_start, num_rows),
                shard.members[row_start : row_start + num_rows],
            )


def _extent(shard: Shard, row_start: int, num_rows: int) -> Extent | None:
    if not shard.offsets:
        return None
    first, last = row_start // GROUP_ROWS, (row_start + num_rows - 1) // GROUP_ROWS
    return Extent(
        shard.offsets[first],
        shard.offsets[last + 1],
        row_start - first * GROUP_ROWS,
        shard.header_end,
    )


def _read_manifest(url: str, storage: Storage) -> list[str] | None:
    try:
        text = storage.cat(url).decode()
    except FileNotFoundError:
        raise InputError(f"input.manifest: {url} does not exist") from None
    except (OSError, StorageError) as exc:
        raise InputError(f"input.manifest: cannot read {url}: {describe(exc)}") from None
    if text.lstrip().startswith("{"):
        return None
    if text.lstrip().startswith("["):
        entries = json.loads(text)
    else:
        entries = [ln.strip() for ln in text.splitlines()]
    return [e for e in entries if e and not e.startswith("#")]


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
    return f"input: no input files match {pattern!r} (Parquet, images, CSV, JSONL, tar)"


def input_patterns(cfg: Config, storage: Storage) -> list[str]:
    """input.paths, then input.manifest: a CSV/JSONL manifest of images is an input itself;
    any other manifest lists input URLs or globs, one a line (or a JSON list)."""
    patterns = list(cfg.input.paths)
    manifest = cfg.input.manifest
    if manifest:
        kind = kind_of_name(manifest)
        if kind in ("csv", "jsonl") and not manifest.lower().endswith(".json"):
            patterns.append(manifest)
        else:
            listed = _read_manifest(manifest, storage)
            # a .json of JSON lines (objects, not a list of URLs) holds rows itself
            patterns += [manifest] if listed is None else listed
    return patterns


def list_inputs(cfg: Config, storage: Storage) -> tuple[str, list[Listed]]:
    """The job's input format and its files, sorted and de-duplicated."""
    found: dict[str, Listed] = {}
    for pattern in input_patterns(cfg, storage):
        try:
            fs, path = storage.fs(pattern)
        except ValueError as exc:  # fsspec: "Protocol not known"
            raise InputError(f"input: {pattern[:200]!r} is not a path or URL: {exc}") from None
        try:
            matches = list_pattern(storage, fs, path, cfg.input.format)
        except (OSError, StorageError) as exc:
            raise InputError(f"input: cannot list {pattern}: {describe(exc)}") from None
        if not matches:
            raise InputError(_no_match_reason(storage, fs, pattern, path))
        for item in matches:
            found.setdefault(item.url, item)
    listed = [found[k] for k in sorted(found)]
    return decide_format(cfg.input.format, listed, storage), listed


def list_shard_urls(cfg: Config, storage: Storage) -> list[tuple[object, str]]:
    """Every input file the job names, as (filesystem, path), sorted and de-duplicated."""
    return [(item.fs, item.path) for item in list_inputs(cfg, storage)[1]]


def _version(info: dict) -> str:
    """What changes when the object is rewritten: its etag, else its modification time."""
    keys = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated")
    return next((str(info[k]) for k in keys if info.get(k) is not None), "")


def _shard_info(index: int, fs, path: str, storage: Storage) -> tuple[Shard, object]:
    try:
        info = storage.call(f"stat {path}", fs.info, path)
        with storage.open_input(fs, path, int(info.get("size") or 0) or None) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as exc:
        raise InputError(
            f"input: cannot read the Parquet footer of {full_url(fs, path)}: {describe(exc)}"
        ) from None
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    shard = Shard(index, full_url(fs, path), int(info.get("size") or 0), _version(info), rows)
    return shard, meta.schema.to_arrow_schema()


def _scanned_shard(index: int, item: Listed, fmt: str, storage: Storage):
    """A CSV, JSONL, Batch or tar file, scanned once for its rows and their offsets."""
    try:
        info = storage.call(f"stat {item.path}", item.fs.info, item.path)
        size = int(info.get("size") or 0)
        layout = sources.scan(item, fmt, size, storage)
    except Exception as exc:
        raise InputError(f"input: cannot read {item.url} as {fmt}: {describe(exc)}") from None
    shard = Shard(
        index,
        item.url,
        size,
        _version(info),
        layout.group_rows(),
        fmt,
        tuple(layout.offsets),
        layout.header_end,
    )
    return shard, layout


def _image_shards(listed: list[Listed], storage: Storage) -> list[Shard]:
    shards: list[Shard] = []
    step = sources.IMAGE_SHARD_FILES
    for root, files in sources.image_listing(listed, storage):
        for k in range(0, len(files), step):
            chunk = files[k : k + step]
            size = sum(f[1] for f in chunk)
            members = tuple(f[0] for f in chunk)
            version = sources.listing_version(chunk)
            shards.append(
                Shard(len(shards), root, size, version, (len(chunk),), "images", members=members)
            )
    return shards


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


def _check_columns(url: str, names: set[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise InputError(
            f"input: {url} lacks column(s) {missing}; it has {sorted(names)}. "
            "Set input.id_column / input.image_column / input.prompt_column or fix the "
            "prompt template fields."
        )


def _intrinsic_names(cfg: Config, fmt: str, columns: set[str]) -> set[str]:
    """The column names a format's rows have, under the job's names for id, image, prompt."""
    renamed = {"id": cfg.input.id_column, "image": cfg.input.image_column}
    renamed["prompt"] = cfg.input.prompt_column
    return {renamed.get(c) or c for c in columns}


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


def _parquet_image_kind(cfg: Config, url: str, schema: pa.Schema, needed: list[str]) -> str:
    """The image column's kind; an InputError if a column is missing or the image column's
    type holds no image."""
    _check_columns(url, set(schema.names), needed)
    column = cfg.input.image_column
    dtype = schema.field(column).type
    kind = image_kind(dtype)
    if kind is None:
        raise InputError(
            f"input.image_column: column {column!r} of {url} is {dtype}, which holds no "
            f"image; it must be {IMAGE_TYPES_ALLOWED}. Set input.image_column to the column "
            "that holds the images."
        )
    return kind


def _scanned_shards(cfg: Config, fmt: str, listed: list[Listed], storage: Storage, needed):
    """Shards of CSV, JSONL, tar or Batch files, and the settings a Batch input asks for."""
    threads = min(FOOTER_THREADS, max(1, len(listed)))
    with ThreadPoolExecutor(threads) as pool:
        scanned = list(
            pool.map(lambda a: _scanned_shard(a[0], a[1], fmt, storage), enumerate(listed))
        )
    if fmt == "openai-batch":
        return [s for s, _ in scanned], batch_settings(cfg, [layout for _, layout in scanned])
    for shard, layout in scanned:
        names = layout.columns
        if fmt == "webdataset":
            names = _intrinsic_names(cfg, fmt, names)
            if "json" in names:  # a sample's JSON fields are known only when read
                continue
        _check_columns(shard.url, names, needed)
    return [s for s, _ in scanned], {}


def plan_job(cfg: Config, storage: Storage | None = None, unit_rows: int | None = None) -> Plan:
    """List, open and fingerprint the input; check the columns the job needs exist and the
    image column holds images. Units are cut at ``unit_rows`` (a resumed job's), else at
    :func:`~.unit_size.sized_unit_rows`."""
    storage = storage or Storage.for_input(cfg)
    fmt, listed = list_inputs(cfg, storage)
    needed = required_columns(cfg)
    settings: dict[str, Any] = {}
    kind = FORMAT_IMAGE_KIND.get(fmt, "uri")
    if fmt == "parquet":
        with ThreadPoolExecutor(min(FOOTER_THREADS, max(1, len(listed)))) as pool:
            infos = list(
                pool.map(
                    lambda a: _shard_info(a[0], a[1].fs, a[1].path, storage), enumerate(listed)
                )
            )
        kinds = [_parquet_image_kind(cfg, shard.url, schema, needed) for shard, schema in infos]
        shards, kind = [s for s, _ in infos], (kinds[0] if kinds else "bytes")
    elif fmt == "images":
        shards = _image_shards(listed, storage)
        for shard in shards[:1]:
            _check_columns(shard.url, _intrinsic_names(cfg, fmt, sources.INTRINSIC[fmt]), needed)
    else:
        shards, settings = _scanned_shards(cfg, fmt, listed, storage, needed)
    digest = hashlib.sha256()
    for s in shards:
        digest.update(f"{s.url}\0{s.size}\0{s.version}\0{s.num_rows}\n".encode())
    rows = sum(s.num_rows for s in shards)
    size = unit_rows or sized_unit_rows(cfg, rows)
    return Plan(shards, digest.hexdigest()[:16], size, kind, fmt, settings)


def batch_settings(cfg: Config, layouts: list) -> dict[str, Any]:
    """What an OpenAI Batch input sets: where rows' ids and prompts are, and the settings most
    of its lines ask for. Passthrough columns have nothing to pass through."""
    if cfg.input.passthrough_columns:
        raise InputError(
            "input.passthrough_columns: an OpenAI Batch file has no columns to pass through "
            "(its rows are custom_id, prompt and image)"
        )
    settings = openai_batch.job_settings(layouts)
    settings["input.id_column"] = cfg.input.id_column or "id"
    settings["input.prompt_column"] = cfg.input.prompt_column or "prompt"
    return settings
