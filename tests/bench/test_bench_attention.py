"""``qvl-batch bench attention`` parses and runs on the CPU: both attentions timed per case, the
same output, figures per layer and per step."""

from __future__ import annotations

import json

import pytest

from qvl_batch.cli import main

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_bench_attention_on_cpu(tmp_path, capsys):
    out = tmp_path / "attention.json"
    argv = ["bench", "attention", "--size", "tiny", "--batch-sizes", "2", "5"]
    argv += ["--cache-lens", "40", "--iters", "2", "--json-out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["shape"] == {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}
    assert [(c["batch"], c["cache_len"]) for c in report["cases"]] == [(2, 40), (5, 40)]
    for case in report["cases"]:
        assert case["max_abs_diff"] <= 1e-5
        assert case["copied_ms_per_step"] == pytest.approx(2 * case["copied_ms_per_layer"], 1e-2)
        assert case["grouped_speedup"] == pytest.approx(
            case["copied_ms_per_layer"] / case["grouped_ms_per_layer"], rel=1e-2
        )
    assert "B=   5 cache    40" in capsys.readouterr().out
