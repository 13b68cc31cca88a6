"""``qvl-batch bench scale`` end to end: two small points on real local Rays, checked for shape
and for an efficiency that is computed from the measured rates (no figures asserted)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from qvl_batch.bench.scale import bench_scale
from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _args(argv: list[str]) -> argparse.Namespace:
    """``qvl-batch bench ARGV`` parsed by the real command line."""
    return build_parser().parse_args(["bench", *argv])


def test_bench_scale_two_points(tmp_path, capsys):
    out = tmp_path / "scale.json"
    args = _args(
        [
            "scale",
            "--workdir",
            str(tmp_path),
            "--actors",
            "1",
            "2",
            "--rows-per-actor",
            "32",
            "--unit-rows",
            "8",
            "--batch-latency",
            "0.1",
            "--json-out",
            str(out),
        ]
    )
    assert bench_scale(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out.read_text())
    assert json.loads(lines[-1]) == report
    assert report["bench"] == "scale" and report["actors"] == [1, 2]

    header = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["actors"])
    for word in ("rows", "pipeline_s", "rows/s", "ideal", "effic.", "load"):
        assert word in lines[header]
    table = [ln.split() for ln in lines[header + 1 : header + 3]]
    assert [int(row[0]) for row in table] == [1, 2]

    points = {p["actors"]: p for p in report["points"]}
    assert sorted(points) == [1, 2]
    for n, p in points.items():
        assert p["status"] == "succeeded"
        assert p["rows"] == 32 * n and p["units"] == 4 * n and p["error_rows"] == 0
        assert 0 < p["pipeline_s"] < p["elapsed_s"]
        # pipeline_s is printed to the millisecond: its rounding, and no more, is allowed.
        rounding = 0.0005 / p["pipeline_s"]
        assert p["steady_rows_per_s"] == pytest.approx(
            p["rows"] / p["pipeline_s"], rel=rounding + 1e-6
        )
        assert p["e2e_rows_per_s"] == pytest.approx(p["rows"] / p["elapsed_s"], rel=1e-3)
        assert p["steady_rows_per_s"] > p["e2e_rows_per_s"] > 0
        assert len(p["load_before"]) == 3 and len(p["load_after"]) == 3
        assert p["model_ceiling_rows_per_s"] == pytest.approx(n * 8 / 0.1)
        # the actors' own account: every row went through the engine in some batch, and the
        # rows of tail backup copies (units of 8 rows) once more
        view = p["actors_view"]
        engine_rows = view["batches"] * view["mean_batch"]  # mean_batch: rounded to 2 decimals
        slack = 0.005 * view["batches"] + 1e-9
        assert p["rows"] - slack <= engine_rows <= p["rows"] + 8 * p["backup_copies"] + slack
        assert 0 < view["util"] <= 1.0 + 1e-6
        assert p["cpu"] is None or p["cpu"]["window_s"] > 0
        # the rate printed in the table is the measured one
        row = next(r for r in table if int(r[0]) == n)
        assert int(row[1]) == p["rows"]
        assert float(row[3]) == pytest.approx(p["steady_rows_per_s"], abs=0.051)

    one, two = points[1]["steady_rows_per_s"], points[2]["steady_rows_per_s"]
    assert points[1]["efficiency"] == pytest.approx(1.0)
    assert points[2]["ideal_rows_per_s"] == pytest.approx(2 * one)
    assert points[2]["efficiency"] == pytest.approx(two / (2 * one))
    assert math.isfinite(points[2]["efficiency"]) and points[2]["efficiency"] > 0
    assert report["efficiency_at_largest"] == points[2]["efficiency"]
