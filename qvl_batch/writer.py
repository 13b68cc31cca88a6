"""Commit one unit: check each row came back exactly once, write part files, then the marker."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import WorkUnit
from .schema import DATA_COLUMNS, ERROR_COLUMNS, LINEAGE
from .state import OutputState, data_file, errors_file


class UnitIncomplete(RuntimeError):
    """An actor's answer for a unit is missing rows or repeats one: the unit is retried."""


def check_exactly_once(unit: WorkUnit, table: pa.Table) -> None:
    rows = np.sort(table.column("source_row").to_numpy())
    expected = np.arange(unit.row_start, unit.row_start + unit.num_rows)
    if len(rows) != len(expected) or not np.array_equal(rows, expected):
        dupes = int(len(rows) - len(np.unique(rows)))
        missing = len(np.setdiff1d(expected, rows))
        raise UnitIncomplete(
            f"unit {unit.unit_id}: {len(rows)} rows back for {unit.num_rows} "
            f"({missing} missing, {dupes} duplicated)"
        )


def _parquet_bytes(table: pa.Table, compression: str) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


def _with_lineage(table: pa.Table, lineage: dict, created_at: dt.datetime) -> pa.Table:
    n = table.num_rows
    values = {**lineage, "created_at": created_at}
    for f in LINEAGE:
        table = table.append_column(f, pa.array([values[f.name]] * n, type=f.type))
    return table


def commit_unit(
    state: OutputState,
    unit: WorkUnit,
    results: pa.Table,
    lineage: dict,
    attempts: int,
    passthrough: list[str],
    compression: str = "zstd",
    structured: list[str] | None = None,
) -> dict:
    """Write ``data/`` and ``errors/`` part files for a unit, then its ledger marker.

    ``structured``: the typed columns of a structured-output schema (data/ only).
    """
    check_exactly_once(unit, results)
    results = results.sort_by("source_row")
    results = results.append_column(
        "source_shard", pa.array([unit.shard_url] * results.num_rows, pa.string())
    )
    now = dt.datetime.now(dt.timezone.utc)
    ok_mask = results.column("ok")
    good = results.filter(ok_mask)
    bad = results.filter(pc.invert(ok_mask))
    files = []
    if good.num_rows:
        columns = DATA_COLUMNS + list(structured or []) + passthrough
        good = _with_lineage(good.select(columns), lineage, now)
        state.write_bytes(data_file(unit.unit_id), _parquet_bytes(good, compression))
        files.append(data_file(unit.unit_id))
    if bad.num_rows:
        bad = bad.append_column("attempts", pa.array([attempts] * bad.num_rows, pa.int32()))
        bad = _with_lineage(bad.select(ERROR_COLUMNS + passthrough), lineage, now)
        state.write_bytes(errors_file(unit.unit_id), _parquet_bytes(bad, compression))
        files.append(errors_file(unit.unit_id))
    codes = pc.value_counts(bad.column("error_code")).to_pylist() if bad.num_rows else []
    record = {
        "unit_id": unit.unit_id,
        "shard": unit.shard_url,
        "row_start": unit.row_start,
        "num_rows": unit.num_rows,
        "data_rows": good.num_rows,
        "reused_rows": good.num_rows - good.column("reused_from").null_count,
        "error_rows": bad.num_rows,
        "error_codes": {c["values"]: c["counts"] for c in codes},
        "files": files,
        "attempts": attempts,
        "committed_at": now.isoformat(),
    }
    state.mark_committed(unit.unit_id, record)
    return record
