"""``qvl-batch bench submit`` on CPU with the tiny model: the processor call TensorRT-LLM makes
in its submitting thread, with the engine's own kwargs, and the mRoPE positions, timed."""

from __future__ import annotations

import json

import pytest

from qvl_batch.bench.submit import bench_submit
from qvl_batch.cli import build_parser

pytest_plugins = ["tests.models"]
pytestmark = pytest.mark.timeout(300)


def test_bench_submit_times_the_submit_path(tmp_path, tiny_model, capsys):
    out = tmp_path / "submit.json"
    argv = ["bench", "submit", "--model", tiny_model, "--requests", "5", "--size", "112"]
    args = build_parser().parse_args([*argv, "--json-out", str(out)])
    assert bench_submit(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["vision_tokens"] == (112 // 28) ** 2  # within the processor's bounds: not resized
    assert set(report["stages_ms"]) == {"processor_slow", "processor_fast", "rope"}
    for name, ms in report["per_request_ms"].items():
        assert ms == pytest.approx(report["stages_ms"][name] + report["stages_ms"]["rope"])
        assert report["requests_per_s_one_thread"][name] == pytest.approx(1e3 / ms)
