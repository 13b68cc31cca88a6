"""The commit marker (marker.py): parsed from bytes, unknown fields ignored, anything that is not
a marker object read as None, and ``to_json`` round trips (empty ``retries`` left out)."""

from __future__ import annotations

import json

import pytest

from qvl_batch.output.marker import Marker


def _marker(**kw) -> Marker:
    fields = dict(
        unit_id="00000-00001",
        shard="memory://in/part-0.parquet",
        row_start=10,
        num_rows=4,
        data_rows=3,
        error_rows=1,
        files=["data/part-00000-00001.parquet", "errors/part-00000-00001.parquet"],
    )
    return Marker(**{**fields, **kw})


def test_to_json_round_trips_and_leaves_out_empty_retries():
    plain = _marker(error_codes={"DECODE_ERROR": 1}, committed_at="2024-01-01T00:00:00Z")
    record = plain.to_json()
    assert "retries" not in record
    assert record["error_codes"] == {"DECODE_ERROR": 1} and record["attempts"] == 1
    assert Marker.parse(json.dumps(record).encode()) == plain
    retried = _marker(retries=[{"pass": 1, "fixed": 1}])
    assert retried.to_json()["retries"] == [{"pass": 1, "fixed": 1}]
    assert Marker.from_json(retried.to_json()) == retried


def test_from_json_ignores_fields_unknown_to_this_version():
    record = {**_marker().to_json(), "from_a_newer_version": 42}
    marker = Marker.from_json(record)
    assert marker == _marker()
    assert not hasattr(marker, "from_a_newer_version")


@pytest.mark.parametrize(
    "blob",
    [b"", b'{"unit_id": "00000-00001", "shard"', b"\xff\xfe not json", b"[1, 2]", b'"text"'],
)
def test_parse_reads_bytes_that_are_not_a_marker_as_none(blob):
    assert Marker.parse(blob) is None
