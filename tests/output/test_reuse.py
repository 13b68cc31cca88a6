"""Incremental runs: a grown dataset computes only its new rows; the rest is carried over."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qvl_batch.commands.verify import verify_output
from qvl_batch.config import ConfigError
from qvl_batch.errors import Exit
from qvl_batch.output.reuse import ReuseIndex, ReuseReader, result_key
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job
from qvl_batch.storage import Storage
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import check_fake_output, input_rows, read_output, write_job

NEW_ROWS = 24  # 10% on top of the fixture's 240


def test_result_key_depends_on_every_part():
    base = ("a" * 64, "sys", "Describe.", "settings")
    keys = {result_key(*base)}
    for i, other in enumerate(("b" * 64, "other", "Describe!", "settings2")):
        keys.add(result_key(*base[:i], other, *base[i + 1 :]))
    assert len(keys) == 5
    assert result_key(*base) == result_key(*base) and len(result_key(*base)) == 32


def test_index_checks_the_full_key_not_only_its_prefix(tmp_path):
    rows = [{"result_key": "0123456789abcdef" + "1" * 16, "text": "one"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    index = ReuseIndex(
        files=[str(tmp_path / "f.parquet")],
        jobs=["job-1"],
        keys=np.array([0x0123456789ABCDEF], np.uint64),
        file_of=np.zeros(1, np.int32),
        row_of=np.zeros(1, np.int32),
    )
    reader = ReuseReader(index, Storage())
    found = reader.find("0123456789abcdef" + "1" * 16)
    assert found is not None and found[0]["text"] == "one" and found[1] == "job-1"
    assert reader.find("0123456789abcdef" + "2" * 16) is None  # same prefix, another key
    assert reader.find("f" * 32) is None


@pytest.fixture
def grown(tmp_path, dataset):
    """Yesterday's shards plus a new shard with 10% more rows (new ids, new images)."""
    out = tmp_path / "grown"
    shutil.copytree(dataset, out)
    spec = SynthSpec(rows=NEW_ROWS, shards=1, row_group_rows=8, max_side=400, seed=11)
    make_dataset(str(tmp_path / "new"), spec)
    table = pq.read_table(tmp_path / "new" / "part-00000.parquet")
    ids = pa.array([f"new-{i:03d}" for i in range(table.num_rows)], pa.string())
    table = table.set_column(table.schema.get_field_index("id"), table.schema.field("id"), ids)
    pq.write_table(table, out / "part-00003.parquet", row_group_size=8)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_second_run_computes_exactly_the_new_rows(tmp_path, dataset, grown, ray_head):
    out1, out2, out3 = tmp_path / "day1", tmp_path / "day2", tmp_path / "day2-longer"
    first = run_job(
        load_job(write_job(tmp_path / "j1.yaml", dataset, out1, ray_head)), progress_bar=False
    )
    assert first.exit_code == Exit.OK, first.lines()
    assert first.reused_this_run == 0
    day1_data, _ = read_output(out1)

    job2 = write_job(tmp_path / "j2.yaml", grown, out2, ray_head, reuse__outputs=[str(out1)])
    second = run_job(load_job(job2), progress_bar=False)
    assert second.exit_code == Exit.OK, second.lines()
    new_ids = {r["id"] for r in input_rows(grown) if r["id"].startswith("new-")}
    new_good = {r["id"] for r in input_rows(grown) if r["id"] in new_ids and r["kind"] != "corrupt"}
    assert len(new_ids) == NEW_ROWS and new_good
    # Every row day 1 answered is carried over; the engine computes exactly the new ones.
    assert second.reused_this_run == len(day1_data)
    assert any("reused: " in line for line in second.lines())
    data, _errors = check_fake_output(grown, out2)  # complete, exactly once, right texts
    computed = {r["id"] for r in data if r["reused_from"] is None}
    assert computed == new_good
    by_id = {r["id"]: r for r in day1_data}
    same = ("text", "finish_reason", "output_tokens", "image_sha256", "result_key", "resized_width")
    for row in data:
        if row["reused_from"] is not None:
            assert row["reused_from"] == first.job_id
            assert {k: row[k] for k in same} == {k: by_id[row["id"]][k] for k in same}
    assert sum(m["reused_rows"] for m in _markers(out2)) == len(day1_data)
    report = verify_output(str(out2))
    assert report.ok, report.violations

    # Other settings make other keys: nothing is carried over into a run with longer answers.
    job3 = write_job(
        tmp_path / "j3.yaml",
        grown,
        out3,
        ray_head,
        reuse__outputs=[str(out1), str(out2)],
        sampling__max_tokens=32,
    )
    third = run_job(load_job(job3), progress_bar=False)
    assert third.exit_code == Exit.OK and third.reused_this_run == 0, third.lines()


def _markers(out):
    import json

    return [json.loads(p.read_text()) for p in (out / "_state" / "units").glob("[!.]*.json")]


def test_reuse_of_something_that_is_not_an_output_stops_before_work(tmp_path, dataset):
    from qvl_batch.run.driver import Driver

    out = tmp_path / "out"
    job = write_job(tmp_path / "j.yaml", dataset, out, None, reuse__outputs=[str(tmp_path)])
    with pytest.raises(ConfigError, match=r"reuse.outputs\[0\]: .*not the output of a qvl-batch"):
        Driver(load_job(job)).prepare()
    assert not out.exists()
    job = write_job(tmp_path / "j.yaml", dataset, out, None, reuse__outputs=[str(out)])
    with pytest.raises(ConfigError, match=r"this job's own output\.path"):
        Driver(load_job(job)).prepare()


def test_a_missing_earlier_output_is_skipped_when_the_job_says_so(tmp_path, dataset, caplog):
    """A nightly job names yesterday's output; on its first night there is none."""
    from qvl_batch.run.driver import Driver

    out, gone = tmp_path / "out", tmp_path / "yesterday"
    job = write_job(tmp_path / "j.yaml", dataset, out, None, reuse__outputs=[str(gone)])
    with pytest.raises(ConfigError, match=r"reuse\.outputs\[0\]: .*if_missing=skip"):
        Driver(load_job(job)).prepare()
    driver = Driver(load_job(job, ["reuse.if_missing=skip"]))
    with caplog.at_level("WARNING", logger="qvl_batch"):
        driver.prepare()
    assert driver._reuse is None  # nothing to carry over; the job runs in full
    assert any("reuse.outputs[0]" in r.message and "skipped" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match=r"reuse\.if_missing: must be one of"):
        load_job(job, ["reuse.if_missing=ignore"])
