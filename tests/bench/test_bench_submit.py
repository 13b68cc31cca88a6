"""``qvl-batch bench submit`` on CPU with the tiny model: what TensorRT-LLM's submitting thread
does per request (processor, mRoPE, image hash, shared-memory copy, IPC, detokenize), timed."""

from __future__ import annotations

import json

import pytest

from qvl_batch.bench.submit import bench_submit
from qvl_batch.cli import build_parser

pytest_plugins = ["tests.models"]
pytestmark = pytest.mark.timeout(300)


def test_bench_submit_times_the_submit_path(tmp_path, tiny_model, capsys):
    out = tmp_path / "submit.json"
    argv = ["bench", "submit", "--model", tiny_model, "--requests", "3", "--sizes", "112", "max"]
    args = build_parser().parse_args([*argv, "--json-out", str(out)])
    assert bench_submit(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    small, large = report["sizes"]
    assert small["vision_tokens"] == (112 // 28) ** 2  # within the processor's bounds: not resized
    assert large["vision_tokens"] == 1280  # the default image.max_pixels, filled
    assert large["pixel_values_mb"] == pytest.approx(1280 * 4 * 1176 * 4 / 1e6)  # ~24 MB
    for run in report["sizes"]:
        stages = run["stages_ms"]
        hashing = "hash_blake3" if "hash_blake3" in stages else "hash_sha256"
        common = ["rope", hashing, "shared_memory", "ipc", "detokenize"]
        assert set(stages) == {"processor_slow", "processor_fast", *common}
        for name, ms in run["per_request_ms"].items():
            assert ms == pytest.approx(stages[name] + sum(stages[c] for c in common))
            assert run["requests_per_s_one_thread"][name] == pytest.approx(1e3 / ms)
