"""The driver benchmark: the real driver over a real plan and real commits, actors simulated."""

from __future__ import annotations

import json

import pytest

from qvl_batch.cli import main
from qvl_batch.commands.verify import verify_output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_driver_commits_every_row_once(tmp_path, capsys):
    args = ["bench", "driver", "--rows", "6000", "--actors", "16", "--unit-rows", "256"]
    assert main([*args, "--repeat", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    best = result["figures"]["local/8"]["best"]
    assert best["rows"] == 6000 and best["units"] >= 6000 // 256
    assert best["rows_per_s"] == pytest.approx(best["rows"] / best["pipeline_s"], rel=0.05)
    assert "16 simulated actors" in out
    # What the simulated actors answered was committed like any job's output.
    report = verify_output(str(tmp_path / "driver-out"))
    assert report.units_committed == best["units"] and report.data_rows == 6000
