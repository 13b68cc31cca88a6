"""``bench gpu``'s runner figures say why rows failed: each error code's rows and first message,
read from the output's ``errors/`` parts (session 12's H100 run failed 69 rows, and the bench
printed neither)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from qvl_batch.bench.gpu_runner import error_codes, errors_line
from qvl_batch.bench.gpu_table import print_table


def _part(path, codes: list[str], messages: list[str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"id": list(range(len(codes))), "error_code": codes, "error_message": messages}
    )
    pq.write_table(table, path)


def test_error_codes_counted_with_each_codes_first_message(tmp_path):
    assert error_codes(tmp_path) == ({}, {})  # no errors/ at all
    _part(
        tmp_path / "errors" / "part-00000.parquet", ["ENGINE_ERROR"] * 2, ["AssertionError: ", "x"]
    )
    _part(
        tmp_path / "errors" / "part-00001.parquet",
        ["IMAGE_DECODE_ERROR", "ENGINE_ERROR"],
        ["cannot identify image", None],
    )
    codes, messages = error_codes(tmp_path)
    assert codes == {"ENGINE_ERROR": 3, "IMAGE_DECODE_ERROR": 1}
    assert messages == {
        "ENGINE_ERROR": "AssertionError: ",
        "IMAGE_DECODE_ERROR": "cannot identify image",
    }
    line = errors_line({"error_codes": codes, "error_messages": messages})
    assert line == (
        "errors: ENGINE_ERROR 3 (first: AssertionError: ); "
        "IMAGE_DECODE_ERROR 1 (first: cannot identify image)"
    )


def test_the_closing_table_prints_a_runners_error_codes(capsys):
    runner = {
        "batch_size": 128,
        "steady_rows_per_s": 1.22,
        "ratio_steady_vs_bare": None,
        "e2e_rows_per_s": 0.84,
        "floor_fraction": 0.01,
        "stage_fractions": {"engine": 0.99},
        "error_codes": {"ENGINE_ERROR": 69},
        "error_messages": {"ENGINE_ERROR": "AssertionError: "},
    }
    report = {"device": "cpu", "size": "tiny", "dtype": "float32", "runners": [runner]}
    print_table({**report, "compute_floor": {"images_per_s": 126.0}})
    assert "errors: ENGINE_ERROR 69 (first: AssertionError: )" in capsys.readouterr().out
