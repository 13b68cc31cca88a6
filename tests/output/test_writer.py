"""The commit (writer.py, state.py): every row exactly once, part files then the marker, orphans
cleaned."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pytest

from qvl_batch.output.schema import DATA_COLUMNS, ERROR_COLUMNS, ROW_RESULT
from qvl_batch.output.state import OutputState
from qvl_batch.output.writer import UnitIncomplete, check_exactly_once, commit_unit
from qvl_batch.rows.manifest import WorkUnit


def _results(rows, ok=True):
    cols = {name: [None] * len(rows) for name in ROW_RESULT.names}
    cols["source_row"] = list(rows)
    cols["id"] = [f"id-{r}" for r in rows]
    cols["ok"] = [ok] * len(rows)
    cols["text"] = ["t" if ok else None for _ in rows]
    cols["error_code"] = [None if ok else "DECODE_ERROR" for _ in rows]
    return pa.table(cols, schema=ROW_RESULT)


def test_exactly_once_check_rejects_missing_and_duplicate_rows():
    unit = WorkUnit("00000-00001", 0, "s", 10, 4)
    check_exactly_once(unit, _results([13, 10, 12, 11]))
    with pytest.raises(UnitIncomplete, match="1 missing"):
        check_exactly_once(unit, _results([10, 11, 12]))
    with pytest.raises(UnitIncomplete, match="1 duplicated"):
        check_exactly_once(unit, _results([10, 11, 12, 12]))


def test_commit_writes_parts_then_marker_and_cleans_orphans():
    fs = fsspec.filesystem("memory")
    root = "memory://commit-test"
    state = OutputState(root)
    unit = WorkUnit("00000-00000", 0, "s", 0, 3)
    table = pa.concat_tables([_results([0, 2]), _results([1], ok=False)])
    lineage = dict(job_id="j", model="m", engine="fake", engine_version="1", config_fingerprint="f")
    writes = []  # every file written, in order: the marker must come after both part files
    write_bytes = state.write_bytes

    def logged(rel, blob):
        writes.append(rel)
        return write_bytes(rel, blob)

    state.write_bytes = logged
    record = commit_unit(state, unit, table, lineage, 1, (DATA_COLUMNS, ERROR_COLUMNS))
    assert record.data_rows == 2 and record.error_codes == {"DECODE_ERROR": 1}
    assert writes == [
        "data/part-00000-00000.parquet",
        "errors/part-00000-00000.parquet",
        "_state/units/00000-00000.json",
    ], writes
    assert state.committed_units() == {"00000-00000"}
    # an interrupted commit of another unit: part file written, marker missing
    fs.pipe_file("/commit-test/data/part-00000-00001.parquet", b"partial")
    fs.pipe_file("/commit-test/data/.tmp-abc-part-00000-00002.parquet", b"tmp")
    # a committed unit's file that its marker does not name (a retry died before its marker)
    fs.pipe_file("/commit-test/data/part-00000-00000.retry-1.parquet", b"unnamed")
    removed = state.clean_orphans(state.markers())
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == [
        ".tmp-abc-part-00000-00002.parquet",
        "part-00000-00000.retry-1.parquet",
        "part-00000-00001.parquet",
    ]
    assert fs.exists("/commit-test/data/part-00000-00000.parquet")
    assert fs.exists("/commit-test/errors/part-00000-00000.parquet")
