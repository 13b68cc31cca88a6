"""``qvl-batch bench step`` on the CPU with the tiny model: a lock-step decode step and the
in-flight step's pieces timed on one loaded model, profiles of both, the ratio in the JSON."""

from __future__ import annotations

import json

import pytest

from qvl_batch.cli import main

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)


def _argv(tmp_path, steps: int, max_tokens: int) -> list[str]:
    return [
        *("bench", "step", "--workdir", str(tmp_path), "--size", "tiny", "--dtype", "float32"),
        *("--cores", "1", "--batch-size", "3", "--image-size", "56", "--decode", "eager"),
        *("--max-tokens", str(max_tokens), "--inflight-tokens", "128", "--steps", str(steps)),
        *("--profile", "--json-out", str(tmp_path / "step.json")),
    ]


def test_bench_step_on_cpu(tmp_path, capsys):
    assert main(_argv(tmp_path, steps=3, max_tokens=16)) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    lock, fly = report["lockstep"], report["inflight"]
    assert lock["rows"] == 3 and lock["steps"] == 16 and lock["decode_ms_per_step"] > 0
    assert fly["slots"] == 3 and fly["length"] >= 128 and fly["decode"] == "eager"
    pieces = ("step_ms", "step_on_thread_ms", "forward_ms", "forward_synced_ms", "choose_ms")
    assert all(fly[k] > 0 for k in pieces), fly
    assert report["inflight_over_lockstep"] == round(fly["step_ms"] / lock["decode_ms_per_step"], 3)
    for side in (lock, fly):  # kernels and the CUDA runtime's calls need CUDA
        prof = side["profile"]
        assert prof["kernel_ms_per_step"] == 0 and prof["top"] == []
        assert isinstance(prof["host_ops"], list)
    assert "in flight (3 x" in capsys.readouterr().out


def test_bench_step_refuses_steps_past_the_answers(tmp_path):
    """Timed rows must not leave: --steps past --max-tokens stops before any model is built."""
    with pytest.raises(SystemExit, match="--max-tokens"):
        main(_argv(tmp_path, steps=10, max_tokens=16))
    assert not (tmp_path / "model-tiny").exists()
