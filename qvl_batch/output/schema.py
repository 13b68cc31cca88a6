"""The output contract: column names and types of data/ and errors/ files.

Fixed Arrow types keep every part file readable as one dataset, even when a unit has only
nulls in a column. In data/, the typed columns of a structured-output schema follow the core
columns; passthrough columns come next with their input types; lineage columns close.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

# What an actor returns per row (one table per unit, rows in input order).
ROW_RESULT = pa.schema(
    [
        ("source_row", pa.int64()),
        ("id", pa.string()),
        ("ok", pa.bool_()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("vision_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("resized_width", pa.int32()),
        ("resized_height", pa.int32()),
        ("image_sha256", pa.string()),
        ("image_notes", pa.string()),  # what preparation changed, e.g. "exif_transposed,draft"
        # sha256 over the image hash, the prompt and the result settings: what reuse matches on
        ("result_key", pa.string()),
        ("reused_from", pa.string()),  # job id of the earlier output a carried-over row is from
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)

DATA_COLUMNS = [
    "id",
    "text",
    "finish_reason",
    "prompt_tokens",
    "vision_tokens",
    "output_tokens",
    "image_width",
    "image_height",
    "resized_width",
    "resized_height",
    "image_sha256",
    "image_notes",
    "result_key",
    "reused_from",
    "source_shard",
    "source_row",
]
ERROR_COLUMNS = [
    "id",
    "error_code",
    "error_message",
    "attempts",
    "image_sha256",
    "source_shard",
    "source_row",
]
LINEAGE = pa.schema(
    [
        ("job_id", pa.string()),
        ("model", pa.string()),
        ("engine", pa.string()),
        ("engine_version", pa.string()),
        ("config_fingerprint", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)


# What a carried-over (reused) row takes from the earlier data row besides text, tokens and its
# structured columns: the image columns.
IMAGE_COLUMNS = DATA_COLUMNS[
    DATA_COLUMNS.index("image_width") : DATA_COLUMNS.index("image_notes") + 1
]


def part_columns(cfg) -> tuple[list[str], list[str]]:
    """Columns of data/ and errors/ part files before lineage, for a job config: the core
    columns, then (data/ only) the structured-output columns, then the passthrough columns."""
    from .structured import columns_of

    schema = cfg.structured.json_schema
    structured = columns_of(schema).names if schema is not None else []
    passthrough = list(cfg.input.passthrough_columns)
    return DATA_COLUMNS + structured + passthrough, ERROR_COLUMNS + passthrough


def reserved_columns() -> set[str]:
    """Names a structured-output property may not take: they are the runner's own columns."""
    return {*ROW_RESULT.names, *DATA_COLUMNS, *ERROR_COLUMNS, *LINEAGE.names, "attempts"}


def result_table(
    row_start: int,
    rows: Sequence[Any],
    results: Sequence[Any],
    metas: Sequence[dict],
    fields: Sequence[pa.Field],
    table: pa.Table,
    passthrough: Sequence[str],
) -> pa.Table:
    """A unit's ``ROW_RESULT`` table: per input row (``RowInput``) its engine result, its image
    columns (``metas``), the structured ``fields`` from each result's values, and the
    ``passthrough`` columns taken from the unit's input ``table``."""
    cols: dict[str, list] = {name: [] for name in ROW_RESULT.names}
    for row, result, meta in zip(rows, results, metas):
        assert result is not None
        ok = result.error_code is None
        cols["source_row"].append(row_start + row.index)
        cols["id"].append(row.row_id)
        cols["ok"].append(ok)
        cols["text"].append(result.text)
        cols["finish_reason"].append(result.finish_reason)
        cols["prompt_tokens"].append(result.prompt_tokens if ok else None)
        cols["vision_tokens"].append(result.vision_tokens if ok else None)
        cols["output_tokens"].append(result.output_tokens if ok else None)
        for name in ("image_width", "image_height", "resized_width", "resized_height"):
            cols[name].append(meta.get(name))
        cols["image_sha256"].append(meta.get("image_sha256"))
        cols["image_notes"].append(meta.get("image_notes"))
        cols["result_key"].append(meta.get("result_key"))
        cols["reused_from"].append(result.reused_from)
        cols["error_code"].append(result.error_code)
        cols["error_message"].append(result.error_message)
    out = pa.table(cols, schema=ROW_RESULT)
    for f in fields:
        values = [r.values.get(f.name) if r.values else None for r in results]
        out = out.append_column(f, pa.array(values, type=f.type))
    indices = pa.array([row.index for row in rows], pa.int64())
    for name in passthrough:
        out = out.append_column(table.schema.field(name), table.column(name).take(indices))
    return out
