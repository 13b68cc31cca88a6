"""``qvl-batch bench gpu`` end to end on CPU: a tiny model, every section, small and fast."""

from __future__ import annotations

import argparse
import json

import pytest

from qvl_batch.bench.gpu import bench_gpu
from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The hf engine's stage clocks (seconds per batch in each)
HF_STAGES = {"inputs", "ahead", "generate", "outputs", "vision", "prefill", "decode", "compile"}


def _tiny_gpu_args(tmp_path, ray_head: str, argv: list[str]) -> argparse.Namespace:
    """``qvl-batch bench gpu`` on the session's Ray (no start-up per run) and the tiny model in
    float32 in ``tmp_path``, then ARGV, parsed by the real command line."""
    common = [f"cluster.address={ray_head}", "--workdir", str(tmp_path)]
    tiny = ["--size", "tiny", "--dtype", "float32"]
    return build_parser().parse_args(["bench", "gpu", *common, *tiny, *argv])


def test_bench_gpu_all_sections_on_cpu(tmp_path, ray_head, capsys):
    out = tmp_path / "gpu.json"
    args = _tiny_gpu_args(
        tmp_path,
        ray_head,
        [
            "--rows",
            "16",
            "--batch-sizes",
            "4",
            "8",
            "--max-tokens",
            "4",
            "--image-size",
            "112",
            "--bare-preprocess",
            "device",
            "processor",
            "--json-out",
            str(out),
        ],
    )
    assert bench_gpu(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(out.read_text())
    assert json.loads(printed) == report
    assert report["device"]

    assert report["sections"] == ["bare", "actor", "runner", "bucketing"]
    bare = report["bare"]
    runs = [(r["preprocess"], r["batch_size"]) for r in bare["runs"]]
    assert runs == [("device", 4), ("device", 8), ("processor", 4), ("processor", 8)]
    for run in bare["runs"]:
        assert run["rows"] == 16 and run["errors"] == 0
        assert run["images_per_s"] > 0 and run["output_tokens_per_s"] > 0
        stages = run["engine_s_per_batch"]
        assert set(stages) == HF_STAGES
        # Stage clocks are per timed batch (the warm-up is not in them): they fit in the run.
        whole = sum(stages[k] for k in ("inputs", "generate", "outputs"))
        batches = -(-16 // run["batch_size"])
        rounding = 0.0005 + 3 * batches * 0.00005  # seconds to 3 decimals, stages to 4
        assert 0 < whole * batches <= run["seconds"] + rounding
        assert 0 < stages["vision"] < stages["prefill"] <= stages["generate"]

    actor = report["actor"]  # the same timing inside an idle Ray actor
    assert actor["rows"] == 16 and actor["errors"] == 0
    assert actor["batch_size"] == bare["best_batch_size"]
    assert actor["ratio_vs_bare"] > 0 and actor["torch_threads"] >= 1
    assert {"inputs", "generate", "outputs", "decode"} <= set(actor["engine_s_per_batch"])

    runner = report["runner"]
    assert runner["status"] == "succeeded" and runner["rows"] == 16
    assert runner["batch_size"] == bare["best_batch_size"]
    assert runner["steady_rows_per_s"] > 0 and runner["e2e_rows_per_s"] > 0
    assert runner["ratio_steady_vs_bare"] > 0
    assert set(runner["stage_fractions"]) == {"read", "prepare", "engine", "engine_idle"}
    per_batch = runner["engine_s_per_batch"]  # the batching adapter's clock, then the engine's
    assert set(per_batch) == {"run", *HF_STAGES}
    assert per_batch["run"] >= per_batch["generate"] > 0
    assert "gpu" not in runner  # sampled only where CUDA is present

    bucketing = report["bucketing"]
    on, exact, off = bucketing["on"], bucketing["exact"], bucketing["off"]
    for run in (on, exact, off):
        assert run["status"] == "succeeded" and run["rows"] == 16
        assert run["steady_rows_per_s"] > 0
        for key in ("padding_fraction", "fifo_padding_fraction"):
            assert 0 <= run["padding"][key] <= 1
    assert on["padding"]["padding_fraction"] <= on["padding"]["fifo_padding_fraction"]
    assert on["padding"]["padding_fraction"] <= off["padding"]["padding_fraction"]
    assert off["padding"]["padding_fraction"] > 0  # mixed sizes in arrival order do pad
    assert exact["padding"]["padding_fraction"] <= on["padding"]["padding_fraction"]
    assert on["padding"]["padding_fraction"] <= 0.1  # batching.max_padding_fraction
    assert bucketing["gain_on_vs_off"] > 0 and bucketing["gain_exact_vs_off"] > 0


def test_bench_gpu_scaling_section_on_cpu(tmp_path, ray_head):
    """The scaling section's plumbing: one job size on one and on two actors."""
    out = tmp_path / "scaling.json"
    args = _tiny_gpu_args(
        tmp_path,
        ray_head,
        [
            "--cores",
            "1",
            "--batch-sizes",
            "4",
            "--max-tokens",
            "2",
            "--image-size",
            "56",
            "--sections",
            "scaling",
            "--scaling-units",
            "2",
            "--json-out",
            str(out),
        ],
    )
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    scaling = report["scaling"]
    assert scaling["unit_rows"] == 4
    (job,) = scaling["jobs"]
    assert job["units"] == 4 and job["rows"] == 16
    for actors in (1, 2):
        run = job[f"actors_{actors}"]
        assert run["status"] == "succeeded" and run["rows"] == 16
        spread = run["units_committed_by_actor"]
        assert len(spread) == actors and sum(spread) == 4
        assert len(run["gpus_by_actor"]) == actors
        assert all(0 <= b <= 1 for b in run["engine_busy_fraction_by_actor"])
    # (which actor commits what is timing here: one may start late, a tail copy may win)
    assert job["actors_2"]["backup_wins"] <= job["actors_2"]["backup_copies"]
    assert job["scaling_2"] == round(
        job["actors_2"]["steady_rows_per_s"] / (2 * job["actors_1"]["steady_rows_per_s"]), 4
    )


def test_bench_gpu_variants_and_contention_on_cpu(tmp_path, ray_head):
    """--vision / --decode / --decode-attention / --answer-lengths in the bare section,
    --runner-variants in the runner section (each compared with its own bare run), and the
    contention section."""
    out = tmp_path / "variants.json"
    args = _tiny_gpu_args(
        tmp_path,
        ray_head,
        [
            "--cores",
            "1",
            "--rows",
            "8",
            "--batch-sizes",
            "4",
            "--max-tokens",
            "6",
            "--image-size",
            "112",
            "--sections",
            "bare,runner,contention",
            "--vision",
            "stock",
            "dense",
            "--decode",
            "eager",
            "--decode-attention",
            "stock",
            "grouped",
            "--answer-lengths",
            "fixed",
            "uniform:1:3",
            "--runner-variants",
            "dense/eager/grouped",
            "--json-out",
            str(out),
        ],
    )
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    runs = report["bare"]["runs"]
    assert [(r["vision"], r["attention"], r["answer_lengths"]) for r in runs] == [
        (vision, attention, lengths)
        for vision in ("stock", "dense")
        for attention in ("stock", "grouped")
        for lengths in ("fixed", "uniform:1:3")
    ]
    for run in runs:
        assert run["rows"] == 8 and run["errors"] == 0 and run["decode"] == "eager"
        want = 6.0 if run["answer_lengths"] == "fixed" else 3.0
        # fixed: every answer runs to max_tokens (unless the tiny model says EOS); uniform 1-3
        assert run["output_tokens_mean"] <= want
    deviation = report["bare"]["vision_deviation"]  # fp32 on the CPU: equal to rounding
    assert deviation["rows"] == 4 and deviation["max_abs_diff"] <= 1e-5 * max(
        1.0, deviation["max_abs_stock"]
    )
    fixed = [r["output_tokens_mean"] for r in runs if r["answer_lengths"] == "fixed"]
    drawn = [r["output_tokens_mean"] for r in runs if r["answer_lengths"] != "fixed"]
    assert min(fixed) > max(drawn)  # the drawn lengths end answers earlier

    runners = report["runners"]
    variant_keys = ("vision", "decode", "attention", "answer_lengths")
    assert [tuple(x["variant"][k] for k in variant_keys) for x in runners] == [
        ("dense", "eager", "grouped", "fixed"),
        ("dense", "eager", "grouped", "uniform:1:3"),
    ]
    for x in runners:
        assert x["status"] == "succeeded" and x["rows"] == 8
        # the runner's actor ran the variant asked for
        (modes,) = x["engine_modes"]
        assert (modes["vision"], modes["decode"], modes["decode_attention"]) == (
            "dense",
            "eager",
            "grouped",
        )
        same = [r for r in runs if all(r[k] == x["variant"][k] for k in variant_keys)]
        assert len(same) == 1 and x["bare_images_per_s"] == same[0]["images_per_s"]

    contention = report["contention"]
    assert contention["alone"]["rows"] == 8 and len(contention["together"]) == 2
    assert all(r["rows"] == 8 for r in contention["together"])
    assert contention["scaling"] == round(
        sum(r["images_per_s"] for r in contention["together"])
        / (2 * contention["alone"]["images_per_s"]),
        4,
    )
