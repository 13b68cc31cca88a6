"""Inputs other than Parquet, read into the same unit tables Parquet gives.

Every format ends as a table with the columns the job needs (``required_columns``) plus an
``_input_error`` pair for rows that could not be read, so ``reader.unit_rows`` and everything
after it treat all inputs alike. Image files by folder or glob are rows of a sorted listing
(id = path relative to the root given); the rest are scanned once at planning
(:mod:`.textfiles`, :mod:`.webdataset`, :mod:`.openai_batch`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Any

import pyarrow as pa

from ..config import Config
from ..storage import Storage, full_url
from . import openai_batch, textfiles, webdataset
from .formats import Listed

ERROR_CODE = "_input_error_code"
ERROR_MESSAGE = "_input_error_message"
# Image files a listing shard holds: shard indexes name output parts, so a folder of a million
# photos is ~100 shards; the driver keeps the listing (~100 bytes a file) while the job runs.
IMAGE_SHARD_FILES = 10_000
SCHEMES = ("data:", "http://", "https://")
# Columns a format gives every row by itself (named by input.id_column / image_column).
INTRINSIC = {"images": {"id", "image"}, "openai-batch": {"id", "image", "prompt"}}


def resolve_relative(value: Any, manifest_url: str) -> Any:
    """An image path in a CSV/JSONL manifest is relative to the manifest's folder."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith(SCHEMES):
        return value
    return (
        value if value.startswith("/") else posixpath.join(posixpath.dirname(manifest_url), value)
    )


def scan(item: Listed, fmt: str, size: int, storage: Storage) -> textfiles.Layout:
    """Rows, group offsets and columns of one CSV, JSONL, Batch or tar file."""
    with storage.open_input(item.fs, item.path, size or None) as fh:
        if fmt == "csv":
            return textfiles.scan_csv(fh, size, item.url)
        if fmt == "webdataset":
            return webdataset.scan_tar(fh, size)
        hook = openai_batch.count_settings if fmt == "openai-batch" else None
        layout = textfiles.scan_jsonl(fh, size, hook)
        if fmt == "openai-batch":
            layout.columns = set(INTRINSIC[fmt])
        return layout


def image_listing(listed: list[Listed], storage: Storage) -> list[tuple[str, list[tuple]]]:
    """Per root URL, its image files as (relative path, size, mtime), sorted by path."""
    by_root: dict[str, list[tuple]] = {}
    for item in listed:
        info = item.info or storage.call(f"stat {item.path}", item.fs.info, item.path)
        version = next((str(info[k]) for k in ("ETag", "etag", "mtime") if info.get(k)), "")
        rel = posixpath.relpath(item.path, item.root) if item.root else item.path
        root = full_url(item.fs, item.root)
        by_root.setdefault(root, []).append((rel, int(info.get("size") or 0), version))
    return [(root, sorted(files)) for root, files in sorted(by_root.items())]


def listing_version(files: list[tuple]) -> str:
    digest = hashlib.sha256()
    for rel, size, version in files:
        digest.update(f"{rel}\0{size}\0{version}\n".encode())
    return digest.hexdigest()[:16]


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # mixed JSON types: as text
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values])


def _job_values(cfg: Config) -> dict[str, Any]:
    return {
        "max_tokens": cfg.sampling.max_tokens,
        "temperature": float(cfg.sampling.temperature),
        "top_p": float(cfg.sampling.top_p),
        "json_schema": cfg.structured.json_schema,
        "system": cfg.prompt.system,
    }


def _rows(unit, cfg: Config, storage: Storage) -> list[dict[str, Any]]:
    """The unit's rows as dicts, by its format."""
    fs, path = storage.fs(unit.shard_url)
    if unit.format == "images":
        return [{"id": rel, "image": posixpath.join(unit.shard_url, rel)} for rel in unit.members]
    ext = unit.extent
    with storage.open_input(fs, path) as fh:
        if unit.format == "webdataset":
            return webdataset.tar_rows(fh, ext.byte_start, ext.byte_end)
        fh.seek(ext.byte_start)
        body = fh.read(ext.byte_end - ext.byte_start)
        head = b""
        if unit.format == "csv":
            fh.seek(0)
            head = fh.read(ext.header_end)
    name = posixpath.basename(unit.shard_url)
    if unit.format == "csv":
        rows = textfiles.csv_rows(head, body, unit.shard_url)
    else:
        lines = textfiles.jsonl_lines(io.BytesIO(body), ext.byte_start)
        rows = [textfiles.parse_json_object(ln, f"{name} at byte {at}") for at, ln in lines]
        if unit.format == "openai-batch":
            job = _job_values(cfg)
            rows = [r if "_error" in r else openai_batch.batch_row(r, job, name) for r in rows]
    return rows


def read_source_table(unit, cfg: Config, needed: list[str], storage: Storage) -> pa.Table:
    """The unit's rows as a table of the ``needed`` columns (and the error pair)."""
    rows = _rows(unit, cfg, storage)
    extent = unit.extent
    if extent is not None:
        rows = rows[extent.skip_rows : extent.skip_rows + unit.num_rows]
    source = {c: c for c in needed}
    if unit.format in ("images", "webdataset", "openai-batch"):  # named by the format
        names = {"prompt": cfg.input.prompt_column, "image": cfg.input.image_column}
        names["id"] = cfg.input.id_column  # last: a projection naming one column for all
        source.update({name: key for key, name in names.items() if name in source})
    columns = {c: _column([r.get(source[c]) for r in rows]) for c in needed}
    errors = [r.get("_error") for r in rows]
    columns[ERROR_CODE] = pa.array([str(e[0]) if e else None for e in errors], pa.string())
    columns[ERROR_MESSAGE] = pa.array([e[1] if e else None for e in errors], pa.string())
    return pa.table(columns)
