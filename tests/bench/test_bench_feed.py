"""``qvl-batch bench feed`` end to end, small: the in-flight simulator fed as a stream beats the
same engine fed batch by batch when answers vary in length (figures measured, not asserted)."""

from __future__ import annotations

import argparse
import json

import pytest

from qvl_batch.bench.feed import bench_feed
from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_bench_feed_streaming_beats_batch_sync(tmp_path, ray_head, capsys):
    out = tmp_path / "feed.json"
    args = _args(
        [
            "feed",
            f"cluster.address={ray_head}",  # the session's Ray (a local one in this process
            # would break the session's connection for later tests)
            "--workdir",
            str(tmp_path),
            "--rows",
            "256",
            "--unit-rows",
            "32",
            "--slots",
            "8",
            "--step-s",
            "0.003",
            "--max-tokens",
            "80",
            "--lengths",
            "lognormal:24:80",
            "--json-out",
            str(out),
        ]
    )
    assert bench_feed(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    run = report["runs"]["lognormal:24:80"]
    for feed in ("stream", "batch_sync"):
        assert run[feed]["status"] == "succeeded" and run[feed]["rows"] == 256
        assert run[feed]["error_rows"] == 0
    assert run["capacity"]["rows"] == 256
    for key in ("stream_rows_per_s", "batch_sync_rows_per_s", "capacity_rows_per_s"):
        assert report[key] > 0
    assert (
        report["stream_vs_capacity"] == report["stream_rows_per_s"] / report["capacity_rows_per_s"]
    )
    # Batch by batch, each batch drains to its longest answer with the engine part-empty.
    assert report["stream_vs_batch_sync"] > 1.0, report
    assert run["stream"]["occupied"] > run["batch_sync"]["occupied"], run
