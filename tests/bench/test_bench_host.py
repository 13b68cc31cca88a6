"""``qvl-batch bench host`` end to end, small: the JSON line carries both rates, their ratio and
where the actor's time went."""

from __future__ import annotations

import json

import pytest

from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_host_reports_rates_ratio_and_actor_time(tmp_path, ray_head, capsys):
    argv = ["bench", "host", f"cluster.address={ray_head}", "--workdir", str(tmp_path)]
    args = build_parser().parse_args([*argv, "--rows", "24", "--repeat", "1", "--cores", "2"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bench"] == "host" and report["rows"] == 24
    (run,) = report["runs"]
    assert run["bare"] > 0 and run["steady"] > 0 and run["e2e"] > 0
    assert report["median_ratio_steady"] == pytest.approx(run["steady"] / run["bare"])
    assert 0 < run["prepare_busy"] <= 1.0  # 2 prepare threads cannot be busy more than all along
    assert 0 < run["read_vs_prepare"] < 1
