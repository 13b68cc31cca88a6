"""Commit one unit: check each row came back exactly once, write part files, then the marker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..rows.manifest import WorkUnit
from .coverage import coverage
from .marker import Marker
from .schema import LINEAGE
from .state import OutputState, data_file, errors_file


class UnitIncomplete(RuntimeError):
    """An actor's answer for a unit is missing rows or repeats one: the unit is retried."""


def check_exactly_once(unit: WorkUnit, table: pa.Table, expected=None) -> None:
    """Every row of ``unit`` (or just ``expected``) answered once, or :class:`UnitIncomplete`."""
    rows = table.column("source_row").to_numpy()
    end = unit.row_start + unit.num_rows
    found = coverage(rows, unit.row_start, end, expected=expected)
    if not found.exact:
        want = unit.num_rows if expected is None else len(expected)
        raise UnitIncomplete(
            f"unit {unit.unit_id}: {len(rows)} rows back for {want} ({found.describe()})"
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


def _split(unit: WorkUnit, results: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(data rows, error rows) of an actor's answer, in row order, with their shard."""
    results = results.sort_by("source_row")
    results = results.append_column(
        "source_shard", pa.array([unit.shard_url] * results.num_rows, pa.string())
    )
    ok_mask = results.column("ok")
    return results.filter(ok_mask), results.filter(pc.invert(ok_mask))


def _code_counts(errors: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(errors.column("error_code")).to_pylist() if errors.num_rows else []
    return {c["values"]: c["counts"] for c in counts}


def commit_unit(
    state: OutputState,
    unit: WorkUnit,
    results: pa.Table,
    lineage: dict,
    attempts: int,
    columns: tuple[list[str], list[str]],
    compression: str = "zstd",
) -> Marker:
    """Write ``data/`` and ``errors/`` part files for a unit, then its ledger marker.

    ``columns``: the data/ and errors/ columns before lineage (:func:`schema.part_columns`).
    """
    check_exactly_once(unit, results)
    data_columns, error_columns = columns
    now = dt.datetime.now(dt.timezone.utc)
    good, bad = _split(unit, results)
    files = []
    if good.num_rows:
        good = _with_lineage(good.select(data_columns), lineage, now)
        state.write_bytes(data_file(unit.unit_id), _parquet_bytes(good, compression))
        files.append(data_file(unit.unit_id))
    if bad.num_rows:
        bad = bad.append_column("attempts", pa.array([attempts] * bad.num_rows, pa.int32()))
        bad = _with_lineage(bad.select(error_columns), lineage, now)
        state.write_bytes(errors_file(unit.unit_id), _parquet_bytes(bad, compression))
        files.append(errors_file(unit.unit_id))
    marker = Marker(
        unit_id=unit.unit_id,
        shard=unit.shard_url,
        row_start=unit.row_start,
        num_rows=unit.num_rows,
        data_rows=good.num_rows,
        reused_rows=good.num_rows - good.column("reused_from").null_count,
        error_rows=bad.num_rows,
        error_codes=_code_counts(bad),
        files=files,
        attempts=attempts,
        committed_at=now.isoformat(),
    )
    state.mark_committed(marker)
    return marker


def commit_retry(
    state: OutputState,
    unit: WorkUnit,
    results: pa.Table,
    lineage: dict,
    marker: Marker,
    retried: pa.Table,
    kept: pa.Table | None,
    columns: tuple[list[str], list[str]],
    compression: str = "zstd",
) -> tuple[Marker, dict]:
    """Fold a retry of some of a unit's error rows into the unit (retry-failed).

    ``results``: the actor's answers for the rows of ``retried`` (the error rows that ran
    again); ``kept``: the unit's other error rows, left as they were (other codes). Rows that
    now succeed go to a new ``data/part-<unit>.retry-<n>.parquet``; the rows still failing and
    ``kept`` to a new errors file that replaces the old one. The marker is rewritten last (the
    commit point); the old errors file is deleted after it. Returns (the new marker record,
    what this pass did).
    """
    check_exactly_once(unit, results, expected=retried.column("source_row").to_numpy())
    data_columns, error_columns = columns
    n = len(marker.retries) + 1
    now = dt.datetime.now(dt.timezone.utc)
    good, bad = _split(unit, results)
    old_files = list(marker.files)
    files = [f for f in old_files if f.startswith("data/")]
    if good.num_rows:
        good = _with_lineage(good.select(data_columns), lineage, now)
        state.write_bytes(data_file(unit.unit_id, n), _parquet_bytes(good, compression))
        files.append(data_file(unit.unit_id, n))
    before = dict(zip(retried["source_row"].to_pylist(), retried["attempts"].to_pylist()))
    attempts = [before[r] + 1 for r in bad["source_row"].to_pylist()]
    bad = bad.append_column("attempts", pa.array(attempts, pa.int32()))
    bad = _with_lineage(bad.select(error_columns), lineage, now)
    if kept is not None and kept.num_rows:
        bad = pa.concat_tables([kept.select(bad.column_names).cast(bad.schema), bad])
    if bad.num_rows:
        bad = bad.sort_by("source_row")
        state.write_bytes(errors_file(unit.unit_id, n), _parquet_bytes(bad, compression))
        files.append(errors_file(unit.unit_id, n))
    record = dataclasses.replace(
        marker,
        data_rows=marker.data_rows + good.num_rows,
        error_rows=bad.num_rows,
        error_codes=_code_counts(bad),
        files=files,
        retries=[
            *marker.retries,
            {
                "job_id": lineage["job_id"],
                "fingerprint": lineage["config_fingerprint"],
                "rows": retried.num_rows,
                "fixed": good.num_rows,
                "committed_at": now.isoformat(),
            },
        ],
    )
    state.mark_committed(record)
    replaced = [f for f in old_files if f not in files]
    state.remove([state.path(f) for f in replaced])
    done = {"num_rows": retried.num_rows, "error_rows": retried.num_rows - good.num_rows}
    return record, {**done, "reused_rows": 0}
