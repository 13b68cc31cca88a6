"""``qvl-batch verify``: a clean output passes; each kind of corruption is caught and named."""

from __future__ import annotations

import argparse
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qvl_batch.commands.verify import (
    NotAJobOutput,
    add_verify_parser,
    verify_output,
)
from qvl_batch.errors import Exit
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import read_output, write_job

pytestmark = pytest.mark.timeout(600)
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_head):
    """One real job's input and output, made once per module: 3 shards of 80 rows, 9 units of
    32 or 16 rows; the corrupt rows (errors/) fall in shards 1 and 2 only."""
    base = tmp_path_factory.mktemp("verify")
    spec = SynthSpec(rows=240, shards=3, row_group_rows=32, max_side=400, corrupt_fraction=0.03)
    make_dataset(str(base / "data"), spec)
    job = write_job(base / "job.yaml", base / "data", base / "out", ray_head)
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    return base


@pytest.fixture
def out(made, tmp_path):
    """A private copy of the module's output, free to corrupt."""
    return shutil.copytree(made / "out", tmp_path / "out")


def cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_verify_parser(parser.add_subparsers())
    args = parser.parse_args(["verify", *map(str, argv)])
    return args.func(args)


def markers(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "_state" / "units").glob("*.json")}


def unit_with(out, errors: bool) -> str:
    """A unit id with a data part and (errors=True) an errors part, or (False) none."""
    return next(u for u, m in sorted(markers(out).items()) if (m["error_rows"] > 0) == errors)


def rewrite(path, edit) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


def set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def problems(out, **kwargs) -> str:
    report = verify_output(str(out), **kwargs)
    assert not report.ok
    return "\n".join(report.violations)


@slow
def test_clean_output_passes_with_right_counts(out, capsys):
    report = verify_output(str(out))
    assert report.ok, report.lines()
    data, errors = read_output(out)
    assert (report.input_rows, report.units_planned, report.units_committed) == (240, 9, 9)
    assert (report.units_pending, report.rows_pending) == (0, 0)
    assert (report.data_rows, report.error_rows) == (len(data), len(errors)) and errors
    assert report.error_codes == {
        c: sum(r["error_code"] == c for r in errors) for c in {r["error_code"] for r in errors}
    }
    assert cli(out) == Exit.OK and ": OK" in capsys.readouterr().out
    assert cli(out, "--json") == Exit.OK
    assert json.loads(capsys.readouterr().out)["data_rows"] == len(data)


@slow
def test_deleted_data_part(out, capsys):
    unit = unit_with(out, errors=False)
    (out / "data" / f"part-{unit}.parquet").unlink()
    text = problems(out)
    assert f"data/part-{unit}.parquet is listed in its marker but missing" in text
    assert f"unit {unit}: 32 input row(s) in neither data/ nor errors/" in text
    assert cli(out) == Exit.PROBLEMS and f"part-{unit}" in capsys.readouterr().out


@slow
def test_orphan_part_and_temporary_file(out):
    unit = unit_with(out, errors=False)
    shutil.copy(out / "data" / f"part-{unit}.parquet", out / "errors" / "part-00009-00000.parquet")
    shutil.copy(out / "data" / f"part-{unit}.parquet", out / "data" / f".tmp-ab12-part-{unit}.x")
    text = problems(out, allow_incomplete=True)  # _SUCCESS is there: leftovers are violations
    assert "errors/part-00009-00000.parquet: orphan part file (no marker for unit 00009-00000)" in (
        text
    )
    assert f"data/.tmp-ab12-part-{unit}.x: temporary file" in text


@slow
def test_part_file_the_marker_does_not_list(out):
    unit = unit_with(out, errors=False)
    shutil.copy(out / "data" / f"part-{unit}.parquet", out / "errors" / f"part-{unit}.parquet")
    text = problems(out)
    assert f"errors/part-{unit}.parquet: not listed in the marker of unit {unit}" in text
    assert f"unit {unit}: 32 source_row(s) more than once" in text


@slow
def test_duplicated_row(out):
    unit = unit_with(out, errors=False)
    path = out / "data" / f"part-{unit}.parquet"
    first = pq.read_table(path).column("source_row")[0].as_py()
    rewrite(path, lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    text = problems(out)
    assert f"unit {unit}: 1 source_row(s) more than once: {first} (data/ x2)" in text
    assert f"unit {unit}: marker says data_rows=32, files have 33" in text


@slow
def test_dropped_row(out):
    unit = unit_with(out, errors=False)
    path = out / "data" / f"part-{unit}.parquet"
    gone = pq.read_table(path).column("source_row")[5].as_py()
    rewrite(path, lambda t: pa.concat_tables([t.slice(0, 5), t.slice(6)]))
    text = problems(out)
    assert f"unit {unit}: 1 input row(s) in neither data/ nor errors/: [{gone}]" in text


@slow
def test_row_moved_from_data_to_errors_of_another_unit(out):
    src, dst = "00001-00000", "00001-00001"  # rows 0-31 and 32-63 of shard 1
    data_path, err_path = (
        out / "data" / f"part-{src}.parquet",
        out / "errors" / f"part-{dst}.parquet",
    )
    data, errs = pq.read_table(data_path), pq.read_table(err_path)
    moved = data.slice(0, 1).to_pylist()[0]
    row = {**moved, "error_code": "DECODE_ERROR", "error_message": "moved", "attempts": 1}
    moved_row = pa.Table.from_pylist([{k: row[k] for k in errs.column_names}], schema=errs.schema)
    pq.write_table(data.slice(1), data_path)
    pq.write_table(pa.concat_tables([errs, moved_row]), err_path)
    text = problems(out)
    missing = f"unit {src}: 1 input row(s) in neither data/ nor errors/: [{moved['source_row']}]"
    assert missing in text
    assert f"unit {dst}: 1 source_row(s) outside its rows 32-63: [{moved['source_row']}]" in text
    assert f"unit {dst}: marker says error_rows=" in text


@slow
def test_row_of_another_shard(out):
    src, dst = "00001-00000", "00002-00000"  # rows 0-31 of shards 1 and 2
    src_path, dst_path = (
        out / "errors" / f"part-{src}.parquet",
        out / "errors" / f"part-{dst}.parquet",
    )
    moved = pq.read_table(src_path).slice(0, 1)
    rewrite(dst_path, lambda t: pa.concat_tables([t, moved]))
    text = problems(out)
    assert f"errors/part-{dst}.parquet: 1 row(s) whose source_shard is not" in text
    assert "more than once" not in text, "a row of another shard is not a duplicate"


@slow
def test_changed_id(out):
    unit = unit_with(out, errors=False)
    path = out / "data" / f"part-{unit}.parquet"
    table = pq.read_table(path)
    ids, row = table.column("id").to_pylist(), table.column("source_row")[3].as_py()
    rewrite(path, lambda t: set_column(t, "id", [*ids[:3], "someone-else", *ids[4:]]))
    text = problems(out)
    assert f"1 id(s) differ from the input: row {row}: 'someone-else', input has {ids[3]!r}" in text


@slow
def test_marker_counts_disagree(out):
    unit = unit_with(out, errors=True)
    path = out / "_state" / "units" / f"{unit}.json"
    marker = json.loads(path.read_text())
    marker["error_codes"] = {"ENGINE_ERROR": marker["error_rows"]}
    marker["data_rows"] += 1
    path.write_text(json.dumps(marker))
    text = problems(out)
    assert f"unit {unit}: marker says data_rows={marker['data_rows']}" in text
    assert f"unit {unit}: marker error_codes {{'ENGINE_ERROR'" in text


@slow
def test_deleted_marker_is_pending_only_with_allow_incomplete(out, capsys):
    unit = unit_with(out, errors=True)
    (out / "_state" / "units" / f"{unit}.json").unlink()
    text = problems(out, allow_incomplete=True)  # _SUCCESS claims the job finished
    assert f"unit {unit} (" in text and "_SUCCESS says the job finished" in text
    (out / "_SUCCESS").unlink()  # now it looks like an interrupted job
    text = problems(out)
    assert f"unit {unit} (" in text and "--allow-incomplete" in text
    assert f"data/part-{unit}.parquet: orphan part file" in text
    report = verify_output(str(out), allow_incomplete=True)
    assert report.ok, report.violations
    assert (report.units_committed, report.units_pending, report.rows_pending) == (8, 1, 32)
    assert report.data_rows + report.error_rows == 240 - 32
    assert cli(out, "--allow-incomplete") == Exit.OK
    assert "1 pending (32 rows)" in capsys.readouterr().out


@slow
def test_changed_input_shard(tmp_path, dataset, ray_head):
    job = write_job(tmp_path / "job.yaml", dataset, tmp_path / "own-out", ray_head)
    assert run_job(load_job(job), progress_bar=False).exit_code == Exit.OK
    assert verify_output(str(tmp_path / "own-out")).ok
    rewrite(sorted(dataset.glob("*.parquet"))[1], lambda t: t.slice(0, t.num_rows - 1))
    text = problems(tmp_path / "own-out")
    assert "the input changed since the job ran" in text


@slow
def test_derived_ids_when_id_column_is_null(out):
    # Rewrite the output as a job with input.id_column=null would have made it.
    job = json.loads((out / "_job.json").read_text())
    job["config"]["input"]["id_column"] = None
    (out / "_job.json").write_text(json.dumps(job))
    for path in [*out.glob("data/*.parquet"), *out.glob("errors/*.parquet")]:
        table = pq.read_table(path)
        ids = [
            f"{s.rsplit('/', 1)[-1]}:{r}"
            for s, r in zip(table["source_shard"].to_pylist(), table["source_row"].to_pylist())
        ]
        pq.write_table(set_column(table, "id", ids), path)
    assert verify_output(str(out)).ok
    unit = unit_with(out, errors=False)
    rewrite(out / "data" / f"part-{unit}.parquet", lambda t: set_column(t, "id", ["x"] * 32))
    assert "32 id(s) differ from the input" in problems(out)


@slow
def test_wrong_column_type(out):
    unit = unit_with(out, errors=False)
    path = out / "data" / f"part-{unit}.parquet"
    rewrite(path, lambda t: t.cast(t.schema.set(3, pa.field("prompt_tokens", pa.int64()))))
    text = problems(out)
    assert f"data/part-{unit}.parquet: column prompt_tokens is int64, expected int32" in text


def test_path_without_job_exits_2(tmp_path, capsys):
    with pytest.raises(NotAJobOutput, match=r"no _job\.json"):
        verify_output(str(tmp_path))
    assert cli(tmp_path) == Exit.CONFIG
    assert "not the output of a qvl-batch job" in capsys.readouterr().err
    assert cli(tmp_path / "missing") == Exit.CONFIG
