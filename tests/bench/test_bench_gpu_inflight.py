"""``bench gpu --schedules lockstep inflight`` on CPU with the tiny model: both schedules, bare
(the in-flight engine fed as a stream on the lock-step engine's loaded model) and through the
runner, with in flight / lock-step in the JSON."""

from __future__ import annotations

import json

import pytest

from qvl_batch.bench.gpu import bench_gpu
from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDED_ONE = 1.001  # an occupancy of 1 from clocks rounded to 4 decimals


def _args(tmp_path, ray_head: str, argv: list[str], overrides: tuple[str, ...] = ()):
    """The session's Ray, the tiny model in float32 in ``tmp_path``, both schedules, ARGV."""
    common = [f"cluster.address={ray_head}", *overrides, "--workdir", str(tmp_path)]
    tiny = ["--size", "tiny", "--dtype", "float32", "--cores", "1"]
    schedules = ["--schedules", "lockstep", "inflight"]
    return build_parser().parse_args(["bench", "gpu", *common, *tiny, *schedules, *argv])


def _check_bare(report: dict, rows: int, pairs: int) -> None:
    """Every in-flight bare run beside its lock-step twin: every row, no error, the same
    answers' lengths (greedy fp32 answers are equal token for token), a ratio."""
    runs = report["bare"]["runs"]
    twins = {}
    for run in runs:
        key = (run["batch_size"], run["answer_lengths"])
        twins.setdefault(key, {})[run["schedule"]] = run
    assert len(twins) == pairs
    for (b, _), both in twins.items():
        lock, fly = both["lockstep"], both["inflight"]
        for run in (lock, fly):
            assert run["rows"] == rows and run["errors"] == 0 and not run["capped"]
            assert run["images_per_s"] > 0
        assert fly["slots"] == b and fly["error_codes"] == {}
        assert fly["output_tokens_mean"] == lock["output_tokens_mean"]
        # (full at times: 1 but for the stage clocks' rounding to 4 decimals)
        assert 0 < fly["occupancy"] <= ROUNDED_ONE and 1 <= fly["peak_active"] <= b
        assert fly["engine_s"]["busy"] > 0 and fly["engine_s"]["decode"] > 0
        assert fly["ratio_vs_lockstep"] == round(fly["images_per_s"] / lock["images_per_s"], 4)
    table = report["inflight_vs_lockstep"]["bare"]
    assert len(table) == pairs
    for x in table:
        assert x["ratio"] == round(x["inflight_rows_per_s"] / x["lockstep_rows_per_s"], 4)
        assert x["errors"] == [0, 0] and x["occupancy"] > 0


def _check_runners(report: dict, rows: int) -> None:
    """Both schedules through the runner: every row, no error row, the actor ran the schedule
    asked for, and the ratio."""
    runners = report["runners"]
    assert [x["variant"]["schedule"] for x in runners] == ["lockstep", "inflight"]
    for x in runners:
        assert x["status"] == "succeeded" and x["rows"] == rows and x["error_rows"] == 0
        (modes,) = x["engine_modes"]
        assert modes.get("schedule", "lockstep") == x["variant"]["schedule"]
        assert x["ratio_steady_vs_bare"] > 0  # each over its own schedule's bare run
    lock, fly = runners
    assert fly["bare_images_per_s"] != lock["bare_images_per_s"]
    (pair,) = report["inflight_vs_lockstep"]["runner"]
    assert pair["lockstep_rows_per_s"] == lock["steady_rows_per_s"]
    assert pair["inflight_rows_per_s"] == fly["steady_rows_per_s"]
    assert pair["ratio"] == round(fly["steady_rows_per_s"] / lock["steady_rows_per_s"], 4)
    assert pair["error_rows"] == [0, 0] and 0 < pair["occupancy"] <= ROUNDED_ONE


def test_bench_gpu_square_both_schedules_on_cpu(tmp_path, ray_head, capsys):
    out = tmp_path / "square.json"
    argv = ["--rows", "8", "--batch-sizes", "2", "4", "--max-tokens", "6", "--image-size", "112"]
    argv += ["--sections", "bare,runner", "--answer-lengths", "fixed", "uniform:1:4"]
    argv += ["--runner-batch-size", "4", "--json-out", str(out)]
    args = _args(tmp_path, ray_head, argv)
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    assert report["schedules"] == ["lockstep", "inflight"]
    _check_bare(report, 8, pairs=4)
    # the runner runs each answer length with each schedule
    runners = report["runners"]
    assert [(x["variant"]["answer_lengths"], x["variant"]["schedule"]) for x in runners] == [
        ("fixed", "lockstep"),
        ("fixed", "inflight"),
        ("uniform:1:4", "lockstep"),
        ("uniform:1:4", "inflight"),
    ]
    for x in runners:
        assert x["status"] == "succeeded" and x["rows"] == 8 and x["error_rows"] == 0
    pairs = report["inflight_vs_lockstep"]["runner"]
    assert [p["variant"].split("/")[-1] for p in pairs] == ["fixed", "uniform:1:4"]
    assert all(p["ratio"] > 0 and p["error_rows"] == [0, 0] for p in pairs)
    printed = capsys.readouterr().out
    assert "in flight vs lock-step" in printed


def test_bench_gpu_photos_both_schedules_on_cpu(tmp_path, ray_head):
    """The photos workload (mixed sizes, caption-like lengths scaled down): the in-flight bare
    run takes the rows in arrival order, the lock-step one the runner's buckets."""
    out = tmp_path / "photos.json"
    argv = ["--workload", "photos", "--rows", "8", "--batch-sizes", "4"]
    argv += ["--max-tokens", "8", "--answer-lengths", "lognormal:4:8", "--json-out", str(out)]
    args = _args(tmp_path, ray_head, argv, ("image.max_pixels=200704",))
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    _check_bare(report, 8, pairs=1)
    _check_runners(report, 8)
    fly = next(r for r in report["bare"]["runs"] if r["schedule"] == "inflight")
    assert fly["floor_fraction"] > 0 and fly["tokens_per_row"]["vision"] > 0
    assert report["workload"]["comparison"]  # the first runner (lock-step) vs its bare run


def test_steady_rate_leaves_out_the_fill_and_the_drain():
    from qvl_batch.bench.stream import steady_rate

    # 4 slots: nothing for 10 s (the fill), then 2 rows/s until the last submit at 20 s, then
    # a slow drain of 1 row/s
    times = [10 + i / 2 for i in range(1, 21)] + [20 + i for i in range(1, 9)]
    assert steady_rate(times, 4, last_in=20.0) == 2.0
    assert steady_rate(times[:3], 4, last_in=20.0) is None  # fewer results than slots
    assert steady_rate(times, 4, last_in=12.5) is None  # fewer than slots in the window


def test_steady_occupancy_leaves_out_the_fill_and_the_drain():
    from qvl_batch.bench.stream import steady_occupancy

    # 4 slots, one result a second: 2 slots busy while filling (to the 4th result at 4 s), all
    # 4 busy until the last submit at 10 s, then 1 busy in the drain
    clock_at, busy, slot = [], 0.0, 0.0
    for t in range(1, 15):
        active = 2 if t <= 4 else 4 if t <= 10 else 1
        busy, slot = busy + 1, slot + active
        clock_at.append((float(t), {"busy": busy, "slot": slot}))
    whole = clock_at[-1][1]["slot"] / clock_at[-1][1]["busy"] / 4
    assert whole < 0.7  # what the whole run says
    assert steady_occupancy(clock_at, 4, last_in=10.0) == 1.0
    assert steady_occupancy(clock_at[:4], 4, last_in=10.0) is None  # no window after the fill
