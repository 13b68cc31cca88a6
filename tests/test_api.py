"""The Python API: a job from a dict with overrides, its summary, its output as a dataset."""

from __future__ import annotations

import shutil

import pytest

from qvl_batch.commands import api
from qvl_batch.errors import ConfigError, Exit, NotAJobOutput

from .byo import make_inputs
from .conftest import expected_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_run_a_dict_job_and_read_its_output(tmp_path, ray_head):
    inputs = make_inputs(tmp_path, n=10)
    out = tmp_path / "out"
    job = {
        "defaults": ["engine/fake"],
        "input": {"paths": [str(inputs.folder)]},
        "batching": {"unit_rows": 4},
        "output": {"path": str(out)},
        "cluster": {"num_actors": 2, "address": ray_head},
    }
    summary = api.run(job, {"prompt.template": "Name the colours.", "sampling.max_tokens": 16})
    assert summary.exit_code == Exit.OK and summary.rows_total == 11, summary.lines()

    data = api.read_output(out).to_table().to_pylist()
    assert sorted(r["id"] for r in data) == sorted(inputs.images)
    for row in data:
        want = expected_for(inputs.images[row["id"]], "Name the colours.", max_tokens=16)
        assert (row["text"], row["finish_reason"]) == want
    errors = api.read_output(out, "errors").to_table().to_pylist()
    assert [(r["id"], r["error_code"]) for r in errors] == [("b/broken.jpg", "DECODE_ERROR")]

    # a part file no marker names (a commit cut short) is not read
    part = next((out / "data").glob("*.parquet"))
    shutil.copy(part, out / "data" / "part-99999-99999.parquet")
    assert api.read_output(out).count_rows() == len(data)
    assert api.verify(str(out)).complete
    assert api.status(str(out)).data_rows == len(data)


def test_bad_jobs_and_paths_raise_what_the_cli_reports(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling\.max_tokens"):
        api.load({"input": {"paths": ["x"]}, "output": {"path": "y"}}, ["sampling.max_tokens=0"])
    with pytest.raises(NotAJobOutput):
        api.read_output(tmp_path)
