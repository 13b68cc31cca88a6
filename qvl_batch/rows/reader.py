"""Read the rows of one work unit: column projection, only the row groups it spans."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from ..errors import RowError, RowFailure
from ..storage import Storage, describe
from .manifest import WorkUnit, required_columns
from .prompts import prompt_from_column, render_prompt, template_fields
from .sources import ERROR_CODE, ERROR_MESSAGE, read_source_table, resolve_relative

# Tokenizers average 3-5 characters per token on natural text; a prompt over this many
# characters per allowed token is refused without tokenizing (a multi-megabyte cell is cheap).
CHARS_PER_TOKEN_CAP = 32


@dataclass
class RowInput:
    """One input row, ready for image preparation (or already failed)."""

    index: int  # position in the unit
    row_id: str
    prompt: str | None
    image: bytes | str | None  # encoded bytes or a URI to fetch
    error: RowFailure | None = None  # when the row is bad as read


def read_unit_table(unit: WorkUnit, cfg: Config, storage: Storage | None = None) -> pa.Table:
    """The unit's rows with only the columns the job needs (each ranged read retried)."""
    storage = storage or Storage.for_input(cfg)
    if unit.format != "parquet":
        table = read_source_table(unit, cfg, required_columns(cfg), storage)
        return _checked(table, unit)
    fs, path = storage.fs(unit.shard_url)
    with storage.open_input(fs, path) as fh:
        # pre_buffer coalesces the column chunks of the row groups into few large reads.
        pf = pq.ParquetFile(fh, pre_buffer=True)
        meta = pf.metadata
        groups, first_offset, offset = [], None, 0
        end = unit.row_start + unit.num_rows
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if offset < end and offset + n > unit.row_start:
                groups.append(i)
                first_offset = offset if first_offset is None else first_offset
            offset += n
        table = pf.read_row_groups(groups, columns=required_columns(cfg))
    return _checked(table.slice(unit.row_start - (first_offset or 0), unit.num_rows), unit)


def _checked(table: pa.Table, unit: WorkUnit) -> pa.Table:
    if table.num_rows != unit.num_rows:
        raise RuntimeError(
            f"{unit.shard_url}: unit {unit.unit_id} expected {unit.num_rows} rows, "
            f"read {table.num_rows} (the shard changed since planning?)"
        )
    return table


def image_source(value: Any) -> bytes | str | None:
    """Binary bytes, a Hugging Face ``{bytes, path}`` struct, or a URI string."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path") or None
    if isinstance(value, (bytes, str)):
        return value or None
    return None


def fetch_uri(uri: str, storage: Storage) -> bytes:
    """Fetch an image by URI (retried on transient errors); failures are FETCH_ERROR rows."""
    try:
        return storage.cat(uri)
    except FileNotFoundError:
        raise RowFailure(RowError.FETCH_ERROR, f"not found: {uri}") from None
    except Exception as exc:
        raise RowFailure(RowError.FETCH_ERROR, f"{uri}: {describe(exc)}") from None


def unit_rows(unit: WorkUnit, table: pa.Table, cfg: Config) -> list[RowInput]:
    """Turn the unit's table into RowInputs: ids, prompts and image sources per row."""
    inp = cfg.input
    n = table.num_rows
    shard_name = posixpath.basename(unit.shard_url)
    ids = table.column(inp.id_column).to_pylist() if inp.id_column else [None] * n
    images = table.column(inp.image_column).to_pylist()
    if unit.format in ("csv", "jsonl"):
        images = [resolve_relative(v, unit.shard_url) for v in images]
    if inp.prompt_column:
        prompt_values = table.column(inp.prompt_column).to_pylist()
    else:
        fields = template_fields(cfg.prompt.template)
        field_values = {f: table.column(f).to_pylist() for f in fields}
    read_errors = _read_errors(table, n)
    rows = []
    for i in range(n):
        derived = f"{shard_name}:{unit.row_start + i}"
        row_id = derived if ids[i] is None else str(ids[i])
        row = RowInput(i, row_id, None, image_source(images[i]))
        try:
            if read_errors[i] is not None:
                raise read_errors[i]
            if inp.id_column and ids[i] is None:
                raise RowFailure(RowError.MISSING_ID, f"id column {inp.id_column!r} is null")
            if inp.prompt_column:
                row.prompt = prompt_from_column(prompt_values[i])
            else:
                values = {f: field_values[f][i] for f in fields}
                row.prompt = render_prompt(cfg.prompt.template, fields, values)
            if len(row.prompt) > CHARS_PER_TOKEN_CAP * cfg.prompt.max_prompt_tokens:
                raise RowFailure(
                    RowError.PROMPT_TOO_LONG,
                    f"prompt is {len(row.prompt):,} characters; prompt.max_prompt_tokens is "
                    f"{cfg.prompt.max_prompt_tokens}",
                )
            if row.image is None:
                raise RowFailure(
                    RowError.MISSING_IMAGE, f"image column {inp.image_column!r} is null"
                )
        except RowFailure as exc:
            row.error = exc
        rows.append(row)
    return rows


def _read_errors(table: pa.Table, n: int) -> list[RowFailure | None]:
    """Rows a non-Parquet source could not read (sources.py), as their failures."""
    if ERROR_CODE not in table.column_names:
        return [None] * n
    codes = table.column(ERROR_CODE).to_pylist()
    messages = table.column(ERROR_MESSAGE).to_pylist()
    return [RowFailure(RowError(c), m) if c else None for c, m in zip(codes, messages)]
