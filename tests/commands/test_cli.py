"""The command line: bad configs and paths stop before any work, with a message and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qvl_batch.errors import Exit

from ..conftest import write_job

pytestmark = pytest.mark.timeout(120)


def cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "qvl_batch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_unknown_key_stops_before_work(tmp_path, dataset):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", dataset, out, None)
    code, text = cli("run", job, "batching.max_batch_sise=4")
    assert code == Exit.CONFIG
    assert "unknown key 'batching.max_batch_sise'" in text and "max_batch_size" in text
    assert not out.exists(), "nothing may be written before the config is valid"


def test_missing_input_stops_before_work(tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tmp_path / "nowhere", out, None)
    code, text = cli("run", job)
    assert code == Exit.CONFIG
    assert "no input files match" in text and "nowhere" in text
    assert not out.exists()


def test_unreadable_shard_stops_before_work(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"this is not parquet")
    out = tmp_path / "out"
    code, text = cli("run", write_job(tmp_path / "job.yaml", data, out, None))
    assert code == Exit.CONFIG
    assert "cannot read the Parquet footer" in text and "part-0.parquet" in text
    assert not out.exists()


def test_missing_job_file_and_bad_value(tmp_path, dataset):
    code, text = cli("run", tmp_path / "nope.yaml")
    assert code == Exit.CONFIG and "config file not found" in text
    job = write_job(tmp_path / "job.yaml", dataset, tmp_path / "out", None)
    code, text = cli("run", job, "sampling.temperature=-1")
    assert code == Exit.CONFIG and "sampling.temperature: must be >= 0" in text


def test_changed_config_is_refused_with_exit_3(tmp_path, dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text(
        '{"job_id": "old", "fingerprint": "0", "fingerprint_fields": {}}'
    )
    # A committed unit: an output that committed nothing is replaced instead (test_first_run).
    (out / "_state" / "units").mkdir(parents=True)
    (out / "_state" / "units" / "00000-00000.json").write_text("{}")
    code, text = cli("run", write_job(tmp_path / "job.yaml", dataset, out, None))
    assert code == Exit.REFUSED
    assert "different config fingerprint" in text and "--fresh" in text
